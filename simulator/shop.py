"""Simulating one shop: the catalogue and buyers, the order stream, the run up to the export
moment, the true probabilities at that moment, and the outcomes after it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from simulator.causes import (
    CARRIER_CAUSE,
    CAUSES,
    SWITCHED_OFF,
    SwitchedOff,
    UsualLevels,
    build_cause_frame,
)
from simulator.parameters import (
    CARRIERS,
    COD_PAYMENT,
    OPEN,
    REGIONS,
    SimulationConfig,
    world_arrays,
)
from simulator.world import (
    Lines,
    Offers,
    PairedGenerator,
    Population,
    Postings,
    Recorder,
    advance,
)

logger = logging.getLogger(__name__)

PENDING = -1  # ordered in the future: inert in every update
DAY = 24.0


@dataclass
class Catalogue:
    offer_id: np.ndarray  # str
    sku: np.ndarray
    name: np.ndarray
    category_id: np.ndarray
    base_price: np.ndarray
    popularity: np.ndarray


@dataclass
class Orders:
    """What is fixed when an order is placed (everything else evolves in ``Postings``)."""

    ordered_h: np.ndarray
    posting_number: np.ndarray
    order_number: np.ndarray
    order_id: np.ndarray
    customer_id: np.ndarray
    payment: np.ndarray
    premium: np.ndarray
    carrier: np.ndarray
    region: np.ndarray
    courier: np.ndarray
    repeat: np.ndarray
    fickleness: np.ndarray
    slow_packing: np.ndarray


@dataclass
class SimulatedWorld:
    """A simulated shop: everything needed to write its history and its truth."""

    config: SimulationConfig
    start: pd.Timestamp
    export_h: float
    catalogue: Catalogue
    orders: Orders
    lines: Lines
    postings: Postings  # state at the export moment
    final: Postings  # state after the horizon (outcomes)
    recorder: Recorder
    observed_prices: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    truth: pd.DataFrame | None  # posting index -> true probability, for postings open at export
    # posting index -> true probability, contribution of each cause, dominant cause
    truth_causes: pd.DataFrame | None = None

    def timestamp(self, hours: np.ndarray) -> pd.DatetimeIndex:
        return self.start + pd.to_timedelta(np.asarray(hours, dtype=float), unit="h")


_NAMES_ZH = ("无线耳机", "手机壳", "LED台灯", "保温杯", "瑜伽垫", "蓝牙音箱", "数据线", "背包")
_NAMES_RU = ("Беспроводные наушники", "Чехол для телефона", "Настольная лампа", "Термокружка")
_NAMES_EN = ("Smart watch strap", "USB-C hub", "Kitchen scale", "Phone holder")


def build_catalogue(config: SimulationConfig, rng: np.random.Generator) -> Catalogue:
    n = config.n_offers
    names = np.array(_NAMES_ZH + _NAMES_RU + _NAMES_EN, dtype=object)
    median = 150.0 if config.currency == "CNY" else 1800.0
    return Catalogue(
        offer_id=np.array(
            [f"SKU-{config.seed % 1000:03d}-{i:04d}" for i in range(n)], dtype=object
        ),
        sku=1_500_000_000 + np.arange(n) * 37 + rng.integers(0, 37, n),
        name=np.array([f"{names[i % len(names)]} #{i}" for i in range(n)], dtype=object),
        category_id=17_027_000 + rng.integers(0, 12, n),
        base_price=np.round(median * np.exp(rng.normal(0.0, 0.6, n)), 2),
        popularity=rng.dirichlet(np.full(n, 0.8)),
    )


def _order_times(config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Order hours: a daily Poisson count with a weekly rhythm, Moscow-time daily profile."""
    days = np.arange(config.days)
    rate = config.orders_per_day * (1.0 + 0.15 * np.sin(2 * np.pi * days / 7.0))
    counts = rng.poisson(rate)
    # Busy from late morning to night in Moscow (UTC+3): UTC hours weighted accordingly.
    profile = np.array(
        [3, 2, 1, 1, 1, 2, 4, 6, 7, 8, 8, 8, 8, 9, 10, 11, 11, 10, 8, 6, 5, 4, 4, 3.0]
    )
    profile /= profile.sum()
    day_of = np.repeat(days, counts)
    hour = rng.choice(24, size=day_of.size, p=profile) + rng.random(day_of.size)
    return np.sort(day_of * DAY + hour)


def build_orders(config: SimulationConfig, rng: np.random.Generator) -> Orders:
    ordered_h = _order_times(config, rng)
    n = ordered_h.size
    # Buyers: a long-tailed pool, so some come back again and again.
    pool = max(int(n * 0.8), 1)
    weights = 1.0 / (np.arange(pool) + 10.0) ** 1.1
    buyer = rng.choice(pool, size=n, p=weights / weights.sum())
    premium_buyer = rng.random(pool) < 0.12
    cod_buyer = rng.random(pool) < 0.22
    fickle = rng.normal(0.0, config.dynamics.fickleness_sd, pool)
    cod = np.where(cod_buyer[buyer], rng.random(n) < 0.85, rng.random(n) < 0.03)
    other_payment = rng.choice(COD_PAYMENT, size=n, p=[0.55, 0.3, 0.15])
    repeat = pd.Series(buyer).groupby(buyer).cumcount().to_numpy() > 0

    serial = np.arange(n)
    prefix = (serial * 7919 + config.seed * 104_729) % 90_000_000 + 10_000_000
    order_number = np.array(
        [f"{a:08d}-{b:04d}" for a, b in zip(prefix, (serial * 31 + 7) % 10_000, strict=True)],
        dtype=object,
    )
    return Orders(
        ordered_h=ordered_h,
        posting_number=np.array([f"{o}-1" for o in order_number], dtype=object),
        order_number=order_number,
        order_id=600_000_000 + serial * 13 + config.seed % 13,
        customer_id=70_000_000 + buyer,
        payment=np.where(cod, COD_PAYMENT, other_payment),
        premium=premium_buyer[buyer],
        carrier=rng.choice(len(CARRIERS), size=n, p=_shares(CARRIERS)),
        region=rng.choice(len(REGIONS), size=n, p=_shares(REGIONS)),
        courier=rng.random(n) < 0.2,
        repeat=repeat,
        fickleness=fickle[buyer],
        slow_packing=rng.random(n) < config.dynamics.slow_packing_share,
    )


def _shares(items: tuple) -> np.ndarray:
    share = np.array([item.share for item in items])
    return share / share.sum()


def build_lines(orders: Orders, catalogue: Catalogue, rng: np.random.Generator) -> Lines:
    n = orders.ordered_h.size
    per_posting = rng.choice([1, 2, 3], size=n, p=[0.8, 0.15, 0.05])
    posting = np.repeat(np.arange(n), per_posting)
    m = posting.size
    return Lines(
        posting=posting,
        offer=rng.choice(catalogue.offer_id.size, size=m, p=catalogue.popularity),
        quantity=rng.choice([1, 2, 3], size=m, p=[0.85, 0.12, 0.03]),
        paid=np.full(m, np.nan),
        list_at_purchase=np.full(m, np.nan),
        promo_at_purchase=np.zeros(m, dtype=bool),
        edits_at_purchase=np.zeros(m, dtype=np.int64),
    )


def initial_postings(orders: Orders, config: SimulationConfig) -> Postings:
    n = orders.ordered_h.size
    arrays = world_arrays()
    promise_end = (
        orders.ordered_h
        + config.dynamics.shipping_deadline_hours / 2
        + arrays["promise_days"][orders.carrier] * DAY
        + arrays["region_extra_hours"][orders.region]
    )
    nan = np.full(n, np.nan)
    return Postings(
        ordered_h=orders.ordered_h.copy(),
        carrier=orders.carrier,
        region=orders.region,
        courier=orders.courier,
        cod=orders.payment == COD_PAYMENT,
        premium=orders.premium,
        repeat=orders.repeat,
        fickleness=orders.fickleness,
        slow_packing=orders.slow_packing,
        handed_h=nan.copy(),
        progress=np.zeros(n),
        quiet_until=np.full(n, -np.inf),
        arrived_h=nan.copy(),
        last_activity_h=orders.ordered_h.copy(),
        next_scan_h=np.full(n, np.inf),
        milestone=np.zeros(n, dtype=np.int64),
        promise_begin_h=np.floor(promise_end / DAY) * DAY - 3 * DAY,
        promise_end_h=np.floor(promise_end / DAY) * DAY + DAY,
        date_changes=np.zeros(n, dtype=np.int64),
        outcome=np.full(n, PENDING),
        closed_h=nan.copy(),
    )


def sub_population(pop: Population, index: np.ndarray) -> tuple[Population, np.ndarray]:
    """The postings ``index`` (and their lines) as a population of their own; shares offers.

    Returns it with the positions of its lines in ``pop``, for :func:`put_back`.
    """
    local = np.full(len(pop.postings.ordered_h), -1)
    local[index] = np.arange(index.size)
    line_index = np.flatnonzero(local[pop.lines.posting] >= 0)
    lines = pop.lines.take(line_index)
    lines.posting = local[lines.posting]
    sub = Population(
        pop.offers, pop.postings.take(index), lines, pop.line_weight[line_index], pop.ids[index]
    )
    return sub, line_index


def put_back(pop: Population, index: np.ndarray, line_index: np.ndarray, sub: Population) -> None:
    for name, values in vars(sub.postings).items():
        getattr(pop.postings, name)[index] = values
    for name in ("paid", "list_at_purchase", "promo_at_purchase", "edits_at_purchase"):
        getattr(pop.lines, name)[line_index] = getattr(sub.lines, name)
    pop.line_weight[line_index] = sub.line_weight


def place_orders(pop: Population, t: float) -> None:
    """Orders placed before hour ``t`` become open, paying the price in force now."""
    new = (pop.postings.outcome == PENDING) & (pop.postings.ordered_h < t)
    if not new.any():
        return
    pop.postings.outcome[new] = OPEN
    li = np.flatnonzero(new[pop.lines.posting])
    offer = pop.lines.offer[li]
    pop.lines.paid[li] = pop.offers.effective_price(t)[offer]
    pop.lines.list_at_purchase[li] = pop.offers.list_price[offer]
    pop.lines.promo_at_purchase[li] = pop.offers.promo_until[offer] > t
    pop.lines.edits_at_purchase[li] = pop.offers.edits[offer]
    value = pop.lines.paid[li] * pop.lines.quantity[li]
    total = np.bincount(pop.lines.posting[li], value, minlength=len(new))
    pop.line_weight[li] = value / total[pop.lines.posting[li]]


def run_until(
    pop: Population,
    t: float,
    end: float,
    config: SimulationConfig,
    rng: np.random.Generator,
    rec: Recorder | None,
    observed: list | None,
) -> float:
    """Run the shop from hour ``t`` to ``end``; orders are placed as their time comes.

    Each simulated day works on a sub-population of the postings that are open or ordered that
    day, so the cost follows the open postings, not the whole history.
    """
    dt = config.step_hours
    arrays = world_arrays()
    ordered_h = pop.postings.ordered_h
    next_order = int(np.searchsorted(ordered_h, t, side="left"))
    while t < end - 1e-9:
        day_end = min(end, (np.floor(t / DAY + 1e-9) + 1) * DAY)
        last = int(np.searchsorted(ordered_h, day_end, side="left"))
        # Orders of yesterday's last step are still pending: they are placed today.
        active = np.flatnonzero(np.isin(pop.postings.outcome[:next_order], (OPEN, PENDING)))
        index = np.concatenate([active, np.arange(next_order, last)])
        sub, line_index = sub_population(pop, index)
        while t < day_end - 1e-9:
            place_orders(sub, t)
            advance(sub, t, dt, config.dynamics, arrays, rng, rec)
            t += dt
        put_back(pop, index, line_index, sub)
        next_order = last
        if observed is not None:
            # The seller's daily price snapshot of every offer.
            n = len(pop.offers.list_price)
            in_promo = pop.offers.promo_until > t
            observed.append(
                (
                    np.arange(n),
                    np.full(n, t),
                    pop.offers.effective_price(t),
                    np.where(in_promo, pop.offers.list_price, np.nan),
                )
            )
    return t


def replicate(pop: Population, index: np.ndarray, reps: int) -> Population:
    """``reps`` replicas of the postings ``index`` of ``pop``, each replica with its own copy
    of the offers (its own future prices and card edits): replica ``r`` holds rows
    ``r * len(index) ...``."""
    n_offers = len(pop.offers.list_price)
    sub, _ = sub_population(pop, index)
    n = index.size
    postings = sub.postings.take(np.tile(np.arange(n), reps))
    line_rep = np.repeat(np.arange(reps), len(sub.lines.posting))
    lines = sub.lines.take(np.tile(np.arange(len(sub.lines.posting)), reps))
    lines.posting = lines.posting + line_rep * n
    lines.offer = lines.offer + line_rep * n_offers
    offers = pop.offers.take(np.tile(np.arange(n_offers), reps))
    return Population(
        offers, postings, lines, np.tile(sub.line_weight, reps), np.tile(sub.ids, reps)
    )


def _twice(pop: Population) -> Population:
    """``pop`` followed by a copy of itself with its own offers (rows ``n ... 2n``)."""
    n, m, k = len(pop.postings.ordered_h), len(pop.lines.posting), len(pop.offers.list_price)
    lines = pop.lines.take(np.tile(np.arange(m), 2))
    lines.posting[m:] += n
    lines.offer[m:] += k
    return Population(
        pop.offers.take(np.tile(np.arange(k), 2)),
        pop.postings.take(np.tile(np.arange(n), 2)),
        lines,
        np.tile(pop.line_weight, 2),
        np.tile(pop.ids, 2),
    )


def _redraw_running_blackouts(
    rollout: Population, t: float, rng: np.random.Generator | PairedGenerator
) -> None:
    blackout_left = rng.exponential(world_arrays()["quiet_days"][rollout.postings.carrier] * DAY)
    p = rollout.postings
    p.quiet_until = np.where(p.quiet_until > t, t + blackout_left, p.quiet_until)


def roll_out(
    rollout: Population,
    t: float,
    config: SimulationConfig,
    rng: np.random.Generator | PairedGenerator,
    *,
    variants: SwitchedOff | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run every row of ``rollout`` from hour ``t`` over the horizon without sampling the
    buyer's cancellation; returns each row's Rao-Blackwellised buyer-cancellation probability
    and, per variant of ``variants``, the same along the same path (``(k, rows)``).

    With a :class:`PairedGenerator` the rollout is two halves of paired rows, which leave the
    rollout together so that their random numbers stay paired.
    """
    arrays = world_arrays()
    rows = len(rollout.postings.ordered_h)
    survival = np.ones(rows)
    buyer_prob = np.zeros(rows)
    path = np.arange(rows)  # which path each row of the shrinking rollout is
    total = np.zeros(rows)
    variant_total = np.zeros((0 if variants is None else len(SWITCHED_OFF), rows))
    cut_short = 0
    end = t + config.horizon_days * DAY
    steps = 0
    while t < end and path.size:
        advance(
            rollout,
            t,
            config.step_hours,
            config.dynamics,
            arrays,
            rng,
            None,
            survival,
            buyer_prob,
            variants,
        )
        t += config.step_hours
        steps += 1
        if steps % 12 == 0 or t >= end:
            # Finished paths leave the rollout, so its cost follows the paths still open.
            alive = (rollout.postings.outcome == OPEN) & (survival > 0)
            if isinstance(rng, PairedGenerator):
                half = alive.size // 2
                either = alive[:half] | alive[half:]
                alive = np.concatenate([either, either])
            total[path[~alive]] = buyer_prob[~alive]
            keep = np.flatnonzero(alive)
            rollout, line_keep = sub_population(rollout, keep)
            if variants is not None:
                # A path the buyer surely abandoned in the real world ends for the variants too.
                cut_short += int(((variants.survival[:, ~alive] > 0).any(axis=0)).sum())
                variant_total[:, path[~alive]] = variants.buyer_prob[:, ~alive]
                variants = variants.take(keep, line_keep)
            if isinstance(rng, PairedGenerator):
                rng.posting_rows = keep.size
            path, survival, buyer_prob = path[keep], survival[keep], buyer_prob[keep]
    total[path] = buyer_prob
    if variants is not None:
        variant_total[:, path] = variants.buyer_prob
    if cut_short:
        logger.debug("%d paths ended with a switched-off variant still open", cut_short)
    return total, variant_total


def truth_rollouts(
    pop: Population,
    open_index: np.ndarray,
    t: float,
    config: SimulationConfig,
    usual: UsualLevels | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The true probability of each open posting (:func:`true_probabilities`) and, with
    ``usual``, its probability with each hazard-only mechanism switched off
    (:class:`simulator.causes.SwitchedOff`, ``(mechanisms, postings)``), along the same paths."""
    reps = config.truth_rollouts
    rng = np.random.default_rng([config.seed, 1])
    n = open_index.size
    rollout = replicate(pop, open_index, reps)
    _redraw_running_blackouts(rollout, t, rng)
    variants = None if usual is None else SwitchedOff(rollout, t, usual)
    total, variant_total = roll_out(rollout, t, config, rng, variants=variants)
    probability = total.reshape(reps, n).mean(axis=0)
    if variants is None:
        return probability, None
    return probability, variant_total.reshape(len(SWITCHED_OFF), reps, n).mean(axis=1)


def true_probabilities(
    pop: Population, open_index: np.ndarray, t: float, config: SimulationConfig
) -> np.ndarray:
    """P(the buyer cancels before delivery) for each open posting, from the state at hour ``t``.

    Rolls the world forward ``truth_rollouts`` times from the same state (offers included, each
    replica with its own future prices and card edits) and averages the Rao-Blackwellised
    buyer-cancellation probability of each path.

    A tracking blackout's end is drawn when the blackout begins, but it is the future, not part
    of the state at hour ``t``: each replica draws what remains of a running blackout afresh.
    Blackout lengths are exponential, so the remainder has the same law as a new blackout and
    the world's dynamics are unchanged; only the truth stops knowing when the blackout ends.
    """
    return truth_rollouts(pop, open_index, t, config)[0]


def carrier_contributions(
    pop: Population,
    open_index: np.ndarray,
    t: float,
    config: SimulationConfig,
    usual: UsualLevels,
) -> np.ndarray:
    """What travelling with its own carrier rather than the shop's usual one adds to each open
    posting's true probability (0 for a posting on the usual carrier or at the pickup point).

    Each posting's ``truth_rollouts`` paths run twice side by side, with its carrier and with
    the usual one from hour ``t`` on, on common random numbers from their own stream (the
    truth's stream is left as it was); the running blackout keeps its own carrier's law.
    """
    p = pop.postings
    acts = (p.carrier[open_index] != usual.carrier) & np.isnan(p.arrived_h[open_index])
    contribution = np.zeros(open_index.size)
    if not acts.any():
        return contribution
    reps, m = config.truth_rollouts, int(acts.sum())
    rollout = _twice(replicate(pop, open_index[acts], reps))
    rng = PairedGenerator(
        np.random.default_rng([config.seed, 4]),
        posting_rows=2 * m * reps,
        offer_rows=len(rollout.offers.list_price),
    )
    _redraw_running_blackouts(rollout, t, rng)
    rollout.postings.carrier[m * reps :] = usual.carrier
    total, _ = roll_out(rollout, t, config, rng)
    own, usual_carrier = total.reshape(2, reps, m).mean(axis=1)
    contribution[acts] = own - usual_carrier
    return contribution


def true_causes(
    pop: Population, open_index: np.ndarray, t: float, config: SimulationConfig, usual: UsualLevels
) -> pd.DataFrame:
    """The true probability of each open posting and every mechanism's contribution to it
    (:func:`simulator.causes.build_cause_frame`)."""
    probability, switched_off = truth_rollouts(pop, open_index, t, config, usual)
    assert switched_off is not None
    contributions = np.zeros((open_index.size, len(CAUSES)))
    for row, cause in enumerate(SWITCHED_OFF):
        contributions[:, CAUSES.index(cause)] = probability - switched_off[row]
    contributions[:, CAUSES.index(CARRIER_CAUSE)] = carrier_contributions(
        pop, open_index, t, config, usual
    )
    return build_cause_frame(open_index, probability, contributions)


def simulate_shop(
    config: SimulationConfig, *, truth: bool = False, causes: bool = True
) -> SimulatedWorld:
    """Simulate the shop for ``config.days`` and then on past the export moment for outcomes.

    With ``truth``, the true probabilities of the postings open at the export moment and, with
    ``causes`` too, every mechanism's contribution to them (:mod:`simulator.causes`).
    """
    rng = np.random.default_rng(config.seed)
    catalogue = build_catalogue(config, rng)
    orders = build_orders(config, rng)
    lines = build_lines(orders, catalogue, rng)
    n_offers = catalogue.offer_id.size
    offers = Offers(
        list_price=catalogue.base_price.copy(),
        promo_price=catalogue.base_price.copy(),
        promo_until=np.full(n_offers, -np.inf),
        edits=np.zeros(n_offers, dtype=np.int64),
    )
    n_postings = orders.ordered_h.size
    pop = Population(
        offers,
        initial_postings(orders, config),
        lines,
        np.zeros(len(lines.posting)),
        np.arange(n_postings),
    )
    rec = Recorder()
    observed: list = []
    export_h = config.days * DAY
    logger.info("simulating %d orders over %d days", orders.ordered_h.size, config.days)
    t = run_until(pop, 0.0, export_h, config, rng, rec, observed)
    place_orders(pop, t)  # orders of the last step are open at the export moment
    at_export = pop.postings.take(np.arange(len(pop.postings.ordered_h)))
    truth_frame = causes_frame = None
    if truth:
        open_index = np.flatnonzero(pop.postings.outcome == OPEN)
        logger.info("rolling out %d open postings x %d", open_index.size, config.truth_rollouts)
        if causes:
            usual = UsualLevels.of_orders(orders.region, orders.carrier)
            causes_frame = true_causes(pop, open_index, t, config, usual)
            truth_frame = causes_frame[["posting", "true_probability"]].copy()
        else:
            prob = true_probabilities(pop, open_index, t, config)
            truth_frame = pd.DataFrame({"posting": open_index, "true_probability": prob})
    # The world goes on without new orders, so every open posting meets its outcome.
    run_until(pop, t, t + config.horizon_days * DAY, config, rng, None, None)
    return SimulatedWorld(
        config=config,
        start=pd.Timestamp(config.start),
        export_h=export_h,
        catalogue=catalogue,
        orders=orders,
        lines=pop.lines,
        postings=at_export,
        final=pop.postings,
        recorder=rec,
        observed_prices=observed,
        truth=truth_frame,
        truth_causes=causes_frame,
    )
