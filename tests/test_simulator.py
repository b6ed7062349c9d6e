"""The simulator: deterministic by seed, contract-shaped, causal mechanisms, calibrated truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.counterfactuals import CAUSES
from simulator import SimulationConfig, simulate_shop, write_history
from simulator.causes import DOMINANT_MIN, SWITCHED_OFF, UsualLevels, contribution_columns
from simulator.parameters import BUYER_CANCELLED, DELIVERED, OPEN
from simulator.shop import _twice, replicate, roll_out, true_causes, true_probabilities
from simulator.world import (
    Lines,
    Offers,
    PairedGenerator,
    Population,
    Postings,
    buyer_log_hazard,
)

SMALL = SimulationConfig(days=25, orders_per_day=60, seed=11, truth_rollouts=32)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def small_world():
    return simulate_shop(SMALL, truth=True)


def test_same_seed_gives_the_same_bytes(tmp_path, small_world):
    write_history(small_world, tmp_path / "a", truth=True)
    write_history(simulate_shop(SMALL, truth=True), tmp_path / "b", truth=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_another_seed_gives_another_shop(tmp_path, small_world):
    write_history(small_world, tmp_path / "a")
    other = SimulationConfig(days=SMALL.days, orders_per_day=SMALL.orders_per_day, seed=12)
    write_history(simulate_shop(other), tmp_path / "b")
    assert _digest(tmp_path / "a")["postings.jsonl"] != _digest(tmp_path / "b")["postings.jsonl"]


def test_history_has_every_contract_file_and_nothing_after_the_export(tmp_path, small_world):
    written = write_history(small_world, tmp_path, truth=True)
    assert {p.name for p in written} == {
        "postings.jsonl",
        "pushes.jsonl",
        "prices.csv",
        "tracking.csv",
        "products.jsonl",
        "truth.csv",
        "truth_causes.csv",
    }
    export = pd.Timestamp(SMALL.start) + pd.Timedelta(days=SMALL.days)
    postings = [json.loads(line) for line in (tmp_path / "postings.jsonl").open()]
    assert len(postings) == small_world.orders.ordered_h.size
    assert max(pd.Timestamp(p["in_process_at"]) for p in postings) <= export
    for name, column in (("prices.csv", "at"), ("tracking.csv", "at")):
        assert (
            pd.to_datetime(pd.read_csv(tmp_path / name)[column], format="ISO8601").max() <= export
        )
    pushes = [json.loads(line) for line in (tmp_path / "pushes.jsonl").open()]
    stamps = [
        p.get("changed_state_date") or p.get("in_process_at") or p.get("changed_at") for p in pushes
    ]
    assert max(pd.Timestamp(s) for s in stamps if s) <= export
    kinds = {p["message_type"] for p in pushes}
    assert {"TYPE_NEW_POSTING", "TYPE_STATE_CHANGED", "TYPE_POSTING_CANCELLED"} <= kinds


def test_every_outcome_the_contract_names_occurs(tmp_path, small_world):
    write_history(small_world, tmp_path)
    postings = [json.loads(line) for line in (tmp_path / "postings.jsonl").open()]
    statuses = {p["status"] for p in postings}
    assert {"delivered", "cancelled", "delivering"} <= statuses
    types = {p["cancellation"]["cancellation_type"] for p in postings if p["status"] == "cancelled"}
    assert {"client", "customer", "seller", "ozon"} <= types


def test_cabinet_csv_format(tmp_path):
    world = simulate_shop(SimulationConfig(days=6, orders_per_day=20, seed=3))
    write_history(world, tmp_path, posting_format="csv")
    raw = (tmp_path / "orders.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    frame = pd.read_csv(tmp_path / "orders.csv", sep=";", encoding="utf-8-sig", dtype=str)
    assert {"Номер отправления", "Принят в обработку", "Статус", "Дата отмены"} <= set(
        frame.columns
    )
    assert frame["Номер отправления"].nunique() == world.orders.ordered_h.size
    assert not (tmp_path / "postings.jsonl").exists()


def _one_posting(**overrides) -> Population:
    """A population of one posting bought at 100 and handed over at hour 10, for hazard checks."""
    postings = Postings(
        ordered_h=np.array([0.0]),
        carrier=np.array([0]),
        region=np.array([0]),
        courier=np.array([False]),
        cod=np.array([False]),
        premium=np.array([False]),
        repeat=np.array([False]),
        fickleness=np.array([0.0]),
        slow_packing=np.array([False]),
        handed_h=np.array([10.0]),
        progress=np.array([0.5]),
        quiet_until=np.array([-np.inf]),
        arrived_h=np.array([np.nan]),
        last_activity_h=np.array([200.0]),
        next_scan_h=np.array([250.0]),
        milestone=np.array([2]),
        promise_begin_h=np.array([300.0]),
        promise_end_h=np.array([400.0]),
        date_changes=np.array([0]),
        outcome=np.array([OPEN]),
        closed_h=np.array([np.nan]),
    )
    for name, value in overrides.items():
        getattr(postings, name)[:] = value
    offers = Offers(
        list_price=np.array([100.0]),
        promo_price=np.array([100.0]),
        promo_until=np.array([-np.inf]),
        edits=np.array([0]),
    )
    lines = Lines(
        posting=np.array([0]),
        offer=np.array([0]),
        quantity=np.array([1]),
        paid=np.array([100.0]),
        list_at_purchase=np.array([100.0]),
        promo_at_purchase=np.array([False]),
        edits_at_purchase=np.array([0]),
    )
    return Population(offers, postings, lines, np.array([1.0]), np.array([0]))


@pytest.mark.parametrize(
    "cause",
    ["price_drop", "tracking_quiet", "late", "card_edit", "not_shipped", "cod"],
)
def test_each_cause_raises_the_buyer_hazard(cause):
    dyn = SMALL.dynamics
    t = 220.0
    calm = buyer_log_hazard(_one_posting(), t, dyn)[0]
    pop = _one_posting()
    if cause == "price_drop":
        pop.offers.list_price[:] = 80.0
    elif cause == "tracking_quiet":
        pop.postings.last_activity_h[:] = t - 6 * 24.0
    elif cause == "late":
        pop.postings.promise_end_h[:] = t - 3 * 24.0
    elif cause == "card_edit":
        pop.offers.edits[:] = 1
    elif cause == "not_shipped":
        pop.postings.handed_h[:] = np.nan
    elif cause == "cod":
        pop.postings.cod[:] = True
    assert buyer_log_hazard(pop, t, dyn)[0] > calm + 0.3


def test_remorse_fades_with_time():
    dyn = SMALL.dynamics
    pop = _one_posting(handed_h=np.nan, last_activity_h=0.0)
    assert buyer_log_hazard(pop, 1.0, dyn)[0] > buyer_log_hazard(pop, 60.0, dyn)[0] + 1.0


def test_true_probabilities_are_calibrated_against_outcomes():
    """Pooled over seeds, the truth agrees with what happened after the export moment."""
    probabilities, outcomes = [], []
    for seed in (21, 22, 23):
        world = simulate_shop(
            SimulationConfig(days=30, orders_per_day=120, seed=seed, truth_rollouts=48),
            truth=True,
            causes=False,
        )
        index = world.truth["posting"].to_numpy()
        final = world.final.outcome[index]
        assert set(np.unique(final)) <= {DELIVERED, BUYER_CANCELLED, 2, 3, 4, 5, OPEN}
        probabilities.append(world.truth["true_probability"].to_numpy())
        outcomes.append((final == BUYER_CANCELLED).astype(float))
    p, y = np.concatenate(probabilities), np.concatenate(outcomes)
    assert p.size > 2000
    assert 0.05 < y.mean() < 0.5
    assert abs(p.mean() - y.mean()) < 0.025
    bins = np.array_split(np.argsort(p), 10)
    ece = sum(b.size * abs(p[b].mean() - y[b].mean()) for b in bins) / p.size
    assert ece < 0.03
    # The truth separates outcomes well; a constant would not.
    top, bottom = bins[-1], bins[0]
    assert y[top].mean() > 0.5 > 0.05 > y[bottom].mean()


def test_the_truth_does_not_know_when_a_running_blackout_ends():
    """Two parcels in the same blackout, one drawn to end in an hour, one in three weeks: the
    end is the future, so their true probabilities are the same."""
    t = 220.0
    config = SimulationConfig(seed=5, truth_rollouts=64, horizon_days=40.0)
    ends_soon = _one_posting(quiet_until=t + 1.0, last_activity_h=t - 30.0)
    ends_late = _one_posting(quiet_until=t + 500.0, last_activity_h=t - 30.0)
    index = np.array([0])
    soon = true_probabilities(ends_soon, index, t, config)
    late = true_probabilities(ends_late, index, t, config)
    np.testing.assert_allclose(soon, late)
    calm = true_probabilities(_one_posting(last_activity_h=t - 30.0), index, t, config)
    assert soon[0] > calm[0]  # a running blackout is still the state: it raises the risk


# --- truth causes ----------------------------------------------------------------------------


def test_truth_causes_round_trip_beside_the_truth(tmp_path, small_world):
    write_history(small_world, tmp_path, truth=True)
    truth = pd.read_csv(tmp_path / "truth.csv", dtype={"posting_number": str})
    causes = pd.read_csv(tmp_path / "truth_causes.csv", dtype={"posting_number": str})
    assert list(causes.columns) == [
        "posting_number",
        "true_probability",
        *contribution_columns(),
        "dominant_cause",
    ]
    assert causes["posting_number"].tolist() == truth["posting_number"].tolist()
    np.testing.assert_array_equal(causes["true_probability"], truth["true_probability"])
    frame = small_world.truth_causes
    contributions = causes[contribution_columns()].to_numpy()
    np.testing.assert_allclose(contributions, frame[contribution_columns()], atol=5e-7)
    best = np.array(CAUSES)[contributions.argmax(axis=1)]
    expected = np.where(contributions.max(axis=1) >= DOMINANT_MIN, best, "none")
    assert causes["dominant_cause"].tolist() == expected.tolist()
    assert set(causes["dominant_cause"]) - {"none"}  # the shop has causes at all


def test_the_causes_leave_the_truth_as_it_was(small_world):
    """The causes ride on the truth's own rollouts and draw no number from its stream."""
    plain = simulate_shop(SMALL, truth=True, causes=False)
    assert plain.truth_causes is None
    np.testing.assert_array_equal(
        plain.truth["true_probability"], small_world.truth["true_probability"]
    )


def test_a_mechanism_that_cannot_act_contributes_exactly_nothing(small_world):
    """On the simulated shop's own state at the export moment: no price below the one paid, no
    price contribution; not handed over, no tracking one; handed over, no waiting one; and so
    on for card edits, lateness and the carrier."""
    world = small_world
    frame = world.truth_causes
    index = frame["posting"].to_numpy()
    p, lines = world.postings, world.lines
    n = len(p.ordered_h)
    export_price = world.observed_prices[-1][2]  # the daily snapshot taken at the export
    cheaper = np.bincount(lines.posting, export_price[lines.offer] < lines.paid, minlength=n)
    edits = np.zeros(len(export_price), dtype=np.int64)
    for offer, _ in world.recorder.card_edits:
        np.add.at(edits, offer, 1)
    edited = np.bincount(lines.posting, edits[lines.offer] > lines.edits_at_purchase, minlength=n)
    handed = ~np.isnan(p.handed_h)
    arrived = ~np.isnan(p.arrived_h)
    late = ~arrived & (p.promise_end_h < world.export_h) | (p.date_changes > 0)
    usual = UsualLevels.of_orders(world.orders.region, world.orders.carrier)
    cannot = {
        "price_drop": cheaper == 0,
        "tracking_quiet": ~handed,
        "not_shipped": handed,
        "listing_changed": edited == 0,
        "late_delivery": ~late,
        "slow_carrier": (p.carrier == usual.carrier) | arrived,
    }
    for cause, mask in cannot.items():
        column = frame[f"contribution_{cause}"].to_numpy()
        assert mask[index].any() and (~mask[index]).any(), cause
        assert (column[mask[index]] == 0).all(), cause
        assert (column[~mask[index]] != 0).mean() > 0.5, cause


HOURS = 220.0
QUICK = SimulationConfig(seed=9, truth_rollouts=48, horizon_days=30.0)


def _causes_of(*populations: Population) -> pd.DataFrame:
    """The truth causes of one-posting populations, each rolled out alone at hour HOURS."""
    frames = [
        true_causes(pop, np.array([0]), HOURS, QUICK, UsualLevels(region=0, carrier=0))
        for pop in populations
    ]
    return pd.concat(frames, ignore_index=True)


def _cheaper(price: float) -> Population:
    pop = _one_posting(last_activity_h=HOURS - 6.0)
    pop.offers.list_price[:] = price
    return pop


def test_the_price_contribution_grows_with_the_fall():
    causes = _causes_of(_cheaper(100.0), _cheaper(90.0), _cheaper(70.0))
    price = causes["contribution_price_drop"].to_numpy()
    assert price[0] == 0.0
    assert 0 < price[1] < price[2]
    assert causes["dominant_cause"].iloc[2] == "price_drop"
    # The price fall changes nothing else: the other hazard-only contributions are the same.
    others = [f"contribution_{c}" for c in ("late_delivery", "not_shipped", "listing_changed")]
    assert (causes[others].to_numpy() == 0).all()


def test_the_tracking_contribution_grows_with_the_silence():
    quiet = [_one_posting(last_activity_h=HOURS - days * 24.0) for days in (0.5, 3.0, 6.0)]
    # Ordered four days ago and still not handed over: silent, but no tracking blackout.
    unshipped = _one_posting(
        ordered_h=HOURS - 96.0, handed_h=np.nan, last_activity_h=HOURS - 96.0, milestone=0
    )
    causes = _causes_of(*quiet, unshipped)
    tracking = causes["contribution_tracking_quiet"].to_numpy()
    assert 0 <= tracking[0] < tracking[1] < tracking[2]
    assert tracking[2] > 0.01
    assert causes["dominant_cause"].iloc[2] == "tracking_quiet"
    assert tracking[3] == 0.0
    assert causes["contribution_not_shipped"].iloc[3] > 0.001
    assert (causes["contribution_not_shipped"].iloc[:3] == 0).all()


def test_lateness_card_edits_and_remorse_each_have_their_contribution():
    on_time = _one_posting(last_activity_h=HOURS - 6.0)
    late = _one_posting(last_activity_h=HOURS - 6.0, promise_end_h=HOURS - 4 * 24.0)
    edited = _one_posting(last_activity_h=HOURS - 6.0)
    edited.offers.edits[:] = 2
    fresh = _one_posting(ordered_h=HOURS - 2.0, handed_h=np.nan, last_activity_h=HOURS - 2.0)
    causes = _causes_of(on_time, late, edited, fresh).set_index(
        pd.Index(["on_time", "late", "edited", "fresh"])
    )
    assert causes.loc["on_time", "contribution_late_delivery"] == 0.0
    assert causes.loc["late", "contribution_late_delivery"] > 0.01
    assert causes.loc["on_time", "contribution_listing_changed"] == 0.0
    assert causes.loc["edited", "contribution_listing_changed"] > 0.03
    assert causes.loc["fresh", "contribution_early_remorse"] > 0.002
    assert causes.loc["on_time", "contribution_early_remorse"] < 1e-4
    assert causes.loc["late", "dominant_cause"] == "late_delivery"
    assert causes.loc["edited", "dominant_cause"] == "listing_changed"


def test_buyer_and_carrier_contributions_compare_with_the_usual():
    usual = _one_posting(last_activity_h=HOURS - 6.0)
    cod = _one_posting(last_activity_h=HOURS - 6.0, cod=True, fickleness=0.5)
    zto = _one_posting(last_activity_h=HOURS - 6.0, carrier=3, progress=0.1)
    zto_arrived = _one_posting(last_activity_h=HOURS - 6.0, carrier=3, arrived_h=HOURS - 5.0)
    causes = _causes_of(usual, cod, zto, zto_arrived)
    buyer = causes["contribution_buyer_profile"].to_numpy()
    carrier = causes["contribution_slow_carrier"].to_numpy()
    # A first-time buyer (the hand-made posting's) is riskier than the usual returning one.
    assert 0 < buyer[0] < buyer[1]
    assert carrier[0] == 0.0  # already the usual carrier
    assert carrier[2] > 0.01  # ZTO: slower, with more and longer blackouts than Cainiao
    assert carrier[3] == 0.0  # at the pickup point: the carrier's part is over


def test_paired_halves_meet_the_same_chances():
    """Without the change, the two halves of a paired rollout are the same paths, so a carrier
    contribution is the carrier's and not the rollouts' noise."""
    world = simulate_shop(SimulationConfig(days=20, orders_per_day=30, seed=4))
    pop = Population(
        Offers(
            list_price=np.full(60, 100.0),
            promo_price=np.full(60, 100.0),
            promo_until=np.full(60, -np.inf),
            edits=np.zeros(60, dtype=np.int64),
        ),
        world.postings,
        world.lines,
        np.ones(len(world.lines.posting)) / np.bincount(world.lines.posting)[world.lines.posting],
        np.arange(len(world.postings.ordered_h)),
    )
    index = np.flatnonzero(world.postings.outcome == OPEN)
    assert index.size > 50
    reps, m = 8, index.size
    rollout = _twice(replicate(pop, index, reps))
    rng = PairedGenerator(np.random.default_rng(1), 2 * m * reps, len(rollout.offers.list_price))
    total, _ = roll_out(rollout, world.export_h, QUICK, rng)
    first, second = total.reshape(2, -1)
    np.testing.assert_array_equal(first, second)
    assert first.std() > 0


def test_switched_off_variants_are_the_mechanisms_of_the_playbook():
    assert set(SWITCHED_OFF) | {"slow_carrier"} == set(CAUSES)
