"""The simulator: deterministic by seed, contract-shaped, causal mechanisms, calibrated truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulator import SimulationConfig, simulate_shop, write_history
from simulator.parameters import BUYER_CANCELLED, DELIVERED, OPEN
from simulator.shop import true_probabilities
from simulator.world import (
    Lines,
    Offers,
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
            SimulationConfig(days=30, orders_per_day=120, seed=seed, truth_rollouts=48), truth=True
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
