"""The simulated seller world: offers, carriers, regions, buyers, and how postings live and die.

Every cause a seller sees is a mechanism here, not a label flip: the buyer's cancellation hazard
rises when the offer's price falls below what they paid, when tracking goes quiet, when the
promised date passes, when the card is edited after purchase, in the first hours after ordering,
with payment on delivery, and with the buyer's own (hidden) fickleness. Seller, Ozon and carrier
cancellations run beside it as competing processes.

One step function, :func:`advance`, moves a :class:`Population` forward by one time step. The
history simulation calls it with a recorder (events become files) and sampled outcomes; the truth
rollouts call it on many replicas of the state at the export moment, without recording, and add up
the buyer-cancellation probability along each path (Rao-Blackwellised), which gives the true
probability with far fewer rollouts than sampling the cancellation itself.

Time is in hours since the simulation start, as float64. The carriers, regions and rates the
step applies are :mod:`simulator.parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from simulator.parameters import (
    BUYER_CANCELLED,
    DELIVERED,
    DELIVERY_CANCELLED,
    MILESTONES,
    OPEN,
    OZON_CANCELLED,
    REGION_SHIFT,
    SELLER_CANCELLED,
    Dynamics,
)

# --------------------------------------------------------------------------------------------
# State


@dataclass
class Offers:
    """Per-offer state. Arrays may hold several replicas of the same offers (truth rollouts)."""

    list_price: np.ndarray
    promo_price: np.ndarray
    promo_until: np.ndarray  # hour the running promotion ends; -inf when none
    edits: np.ndarray  # card edits so far

    def effective_price(self, t: float) -> np.ndarray:
        return np.where(self.promo_until > t, self.promo_price, self.list_price)

    def take(self, index: np.ndarray) -> Offers:
        return Offers(**{f.name: getattr(self, f.name)[index].copy() for f in fields(self)})


@dataclass
class Postings:
    """Per-posting state of the postings that have been ordered."""

    ordered_h: np.ndarray
    carrier: np.ndarray
    region: np.ndarray
    courier: np.ndarray  # delivery to the door, not a pickup point
    cod: np.ndarray
    premium: np.ndarray
    repeat: np.ndarray  # buyer had earlier orders
    fickleness: np.ndarray  # hidden buyer propensity (log-hazard)
    slow_packing: np.ndarray  # hidden: the seller struggles to ship this one
    handed_h: np.ndarray  # handover hour; nan before
    progress: np.ndarray  # 0..1 towards the pickup point
    quiet_until: np.ndarray  # tracking blackout ends at this hour
    arrived_h: np.ndarray  # arrival at the pickup point; nan before
    last_activity_h: np.ndarray  # last scan or state change the buyer could see
    next_scan_h: np.ndarray  # when the carrier scans next, unless tracking goes quiet
    milestone: np.ndarray  # index of the next milestone in MILESTONES
    promise_begin_h: np.ndarray
    promise_end_h: np.ndarray
    date_changes: np.ndarray
    outcome: np.ndarray
    closed_h: np.ndarray

    def take(self, index: np.ndarray) -> Postings:
        return Postings(**{f.name: getattr(self, f.name)[index].copy() for f in fields(self)})


@dataclass
class Lines:
    """Product lines: which posting, which offer, what was paid, and the card state then."""

    posting: np.ndarray
    offer: np.ndarray
    quantity: np.ndarray
    paid: np.ndarray  # unit price paid
    list_at_purchase: np.ndarray  # the regular price then (above paid during a promotion)
    promo_at_purchase: np.ndarray
    edits_at_purchase: np.ndarray

    def take(self, index: np.ndarray) -> Lines:
        return Lines(**{f.name: getattr(self, f.name)[index].copy() for f in fields(self)})


@dataclass
class Population:
    offers: Offers
    postings: Postings
    lines: Lines
    line_weight: np.ndarray  # value share of each line within its posting
    ids: np.ndarray  # each posting's index in the whole shop (what the recorder writes down)


# --------------------------------------------------------------------------------------------
# Dynamics


def buyer_log_hazard(pop: Population, t: float, dyn: Dynamics) -> np.ndarray:
    """Log of the buyer's cancellation hazard for every posting at hour ``t``."""
    p, lines = pop.postings, pop.lines
    n = len(p.ordered_h)
    age = t - p.ordered_h

    current = pop.offers.effective_price(t)[lines.offer]
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.clip(1.0 - current / lines.paid, 0.0, None)
    drop = np.nan_to_num(drop)
    in_promo = (pop.offers.promo_until[lines.offer] > t) & ~lines.promo_at_purchase
    price_drop = np.bincount(lines.posting, pop.line_weight * drop, minlength=n)
    promo_visible = np.bincount(lines.posting, in_promo & (drop > 0), minlength=n) > 0
    edits = np.bincount(
        lines.posting, pop.offers.edits[lines.offer] - lines.edits_at_purchase, minlength=n
    )

    handed = ~np.isnan(p.handed_h)
    arrived = ~np.isnan(p.arrived_h)
    in_transit = handed & ~arrived
    quiet_days = np.where(in_transit, (t - p.last_activity_h) / 24.0 - dyn.quiet_after_days, 0.0)
    late_days = np.where(arrived, 0.0, (t - p.promise_end_h) / 24.0)
    unshipped_days = np.where(handed, 0.0, (age - dyn.not_shipped_after_hours) / 24.0)

    eta = (
        np.log(dyn.buyer_base_per_hour)
        + REGION_SHIFT[p.region]
        + dyn.cod_effect * p.cod
        + dyn.premium_effect * p.premium
        + dyn.repeat_buyer_effect * p.repeat
        + p.fickleness
        + dyn.remorse_effect * np.exp(-age / dyn.remorse_hours)
        + dyn.price_drop_effect * price_drop
        + dyn.promo_visible_effect * promo_visible
        + dyn.quiet_effect_per_day * np.clip(quiet_days, 0.0, dyn.quiet_cap_days)
        + dyn.late_effect_per_day * np.clip(late_days, 0.0, dyn.late_cap_days)
        + dyn.not_shipped_effect_per_day * np.clip(unshipped_days, 0.0, dyn.not_shipped_cap_days)
        + dyn.card_edit_effect * np.minimum(edits, 3)
        + dyn.date_change_effect * np.minimum(p.date_changes, 3)
    )
    return np.where(arrived, eta + np.log(dyn.at_pickup_factor), eta)


def other_cancel_hazards(pop: Population, t: float, dyn: Dynamics) -> tuple[np.ndarray, ...]:
    """Seller and carrier cancellation hazards per hour (Ozon's is a deadline, see advance)."""
    p = pop.postings
    handed = ~np.isnan(p.handed_h)
    overdue = ~handed & (t - p.ordered_h > dyn.shipping_deadline_hours)
    seller = np.where(
        handed, 0.0, np.where(overdue, dyn.seller_cancel_late_per_hour, dyn.seller_cancel_per_hour)
    )
    carrier = np.where(handed & np.isnan(p.arrived_h), dyn.delivery_cancel_per_hour, 0.0)
    return seller, carrier


class Recorder:
    """Collects what the seller's archive would see, as column arrays per event kind."""

    def __init__(self) -> None:
        self.states: list[tuple[np.ndarray, np.ndarray, str]] = []  # (posting, hour, state)
        self.scans: list[tuple[np.ndarray, np.ndarray]] = []
        self.date_changes: list[tuple[np.ndarray, ...]] = []
        self.prices: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.card_edits: list[tuple[np.ndarray, np.ndarray]] = []


def _scan_gap(
    arrays: dict[str, np.ndarray], carrier: np.ndarray, dyn: Dynamics, rng: np.random.Generator
) -> np.ndarray:
    shape = dyn.scan_regularity
    return arrays["scan_every"][carrier] * rng.gamma(shape, 1.0 / shape, carrier.size)


def _jitter(rng: np.random.Generator, t: float, dt: float, n: int) -> np.ndarray:
    return t + rng.uniform(0.0, dt, n)


def advance_offers(
    offers: Offers,
    t: float,
    dt: float,
    dyn: Dynamics,
    rng: np.random.Generator,
    rec: Recorder | None,
) -> None:
    """Seller price changes, promotions starting and ending, card edits."""
    n = len(offers.list_price)
    ended = (offers.promo_until > t - dt) & (offers.promo_until <= t)
    change = rng.random(n) < dyn.price_change_per_day * dt / 24.0
    factor = np.exp(rng.normal(dyn.price_change_log_mean, dyn.price_change_log_sd, n))
    offers.list_price = np.where(change, np.round(offers.list_price * factor, 2), offers.list_price)
    start = (offers.promo_until <= t) & (rng.random(n) < dyn.promo_per_day * dt / 24.0)
    depth = rng.uniform(*dyn.promo_depth, n)
    length = rng.uniform(*dyn.promo_hours, n)
    offers.promo_price = np.where(
        start, np.round(offers.list_price * (1 - depth), 2), offers.promo_price
    )
    offers.promo_until = np.where(start, t + length, offers.promo_until)
    edit = rng.random(n) < dyn.card_edit_per_day * dt / 24.0
    offers.edits = offers.edits + edit
    if rec is not None:
        moved = np.flatnonzero(change | start | ended)
        at = _jitter(rng, t, dt, moved.size)
        in_promo = offers.promo_until[moved] > t
        price = np.where(in_promo, offers.promo_price[moved], offers.list_price[moved])
        old = np.where(in_promo, offers.list_price[moved], np.nan)
        rec.prices.append((moved, at, price, old))
        edited = np.flatnonzero(edit)
        rec.card_edits.append((edited, _jitter(rng, t, dt, edited.size)))


def advance(
    pop: Population,
    t: float,
    dt: float,
    dyn: Dynamics,
    arrays: dict[str, np.ndarray],
    rng: np.random.Generator,
    rec: Recorder | None = None,
    survival: np.ndarray | None = None,
    buyer_prob: np.ndarray | None = None,
) -> None:
    """Move every open posting of ``pop`` from hour ``t`` to ``t + dt``.

    With ``survival``/``buyer_prob`` given (truth rollouts), cancellations are not sampled: each
    path accumulates the probability that the buyer cancels within the step, given it survived
    so far, and survival shrinks by the step's total cancellation probability. Deliveries and
    deadlines are still sampled or applied, since they end the path.
    """
    advance_offers(pop.offers, t, dt, dyn, rng, rec)
    p = pop.postings
    open_ = p.outcome == OPEN
    n = len(open_)
    carrier = p.carrier

    # Hazards use the state at the start of the step.
    buyer = np.exp(buyer_log_hazard(pop, t, dyn))
    seller, lost = other_cancel_hazards(pop, t, dyn)
    p_buyer = 1.0 - np.exp(-buyer * dt)
    p_other = 1.0 - np.exp(-(seller + lost) * dt)

    handed = ~np.isnan(p.handed_h)
    arrived = ~np.isnan(p.arrived_h)

    # Seller hands the posting over.
    handover_rate = np.where(p.slow_packing, dyn.slow_handover_per_hour, dyn.handover_per_hour)
    ship_now = (
        open_
        & ~handed
        & (t - p.ordered_h >= dyn.handover_start_hours)
        & (rng.random(n) < 1.0 - np.exp(-handover_rate * dt))
    )
    ship_at = _jitter(rng, t, dt, n)
    p.handed_h = np.where(ship_now, ship_at, p.handed_h)
    p.next_scan_h = np.where(
        ship_now, ship_at + _scan_gap(arrays, carrier, dyn, rng), p.next_scan_h
    )

    # Transit: progress, blackouts, scans, milestones, arrival.
    moving = open_ & handed & ~arrived
    quiet = p.quiet_until > t
    start_quiet = moving & ~quiet & (rng.random(n) < arrays["quiet_per_day"][carrier] * dt / 24)
    p.quiet_until = np.where(
        start_quiet, t + rng.exponential(arrays["quiet_days"][carrier] * 24.0), p.quiet_until
    )
    quiet = p.quiet_until > t
    speed = dt / (arrays["transit_hours"][carrier] + arrays["region_extra_hours"][p.region])
    noise = rng.gamma(dyn.transit_noise_shape, 1.0 / dyn.transit_noise_shape, n)
    step = speed * noise * np.where(quiet, dyn.quiet_progress_factor, 1.0)
    p.progress = np.where(moving, np.minimum(p.progress + step, 1.0), p.progress)
    # A blackout holds the due scan back; the parcel resurfaces with a scan when it ends.
    scan = moving & ~quiet & (p.next_scan_h < t + dt)
    scan_at = np.clip(p.next_scan_h, t, t + dt - 1e-6)
    p.last_activity_h = np.where(scan, scan_at, p.last_activity_h)
    p.next_scan_h = np.where(scan, scan_at + _scan_gap(arrays, carrier, dyn, rng), p.next_scan_h)

    # Milestone pushes (the handover itself is milestone 0).
    reached = np.zeros(n, dtype=bool)
    for k, (threshold, state) in enumerate(MILESTONES):
        if k == 0:
            hit = ship_now
            at = ship_at
        else:
            hit = moving & (p.milestone == k) & (p.progress >= threshold)
            at = _jitter(rng, t, dt, n)
        p.milestone = np.where(hit, k + 1, p.milestone)
        p.last_activity_h = np.where(hit, np.fmax(p.last_activity_h, at), p.last_activity_h)
        if state == "posting_in_pickup_point":
            p.arrived_h = np.where(hit, at, p.arrived_h)
        reached |= hit
        if rec is not None and hit.any():
            idx = np.flatnonzero(hit)
            rec.states.append((pop.ids[idx], at[idx], state))
    if rec is not None and scan.any():
        idx = np.flatnonzero(scan)
        rec.scans.append((pop.ids[idx], scan_at[idx]))

    # Ozon moves the promise when a parcel is late and still travelling.
    late = moving & (t > p.promise_end_h)
    move = late & (rng.random(n) < 1.0 - np.exp(-dyn.date_change_when_late_per_hour * dt))
    if move.any():
        idx = np.flatnonzero(move)
        at = _jitter(rng, t, dt, idx.size)
        new_end = at + rng.uniform(*dyn.date_change_shift_days, idx.size) * 24.0
        if rec is not None:
            rec.date_changes.append(
                (
                    pop.ids[idx],
                    at,
                    p.promise_begin_h[idx].copy(),
                    p.promise_end_h[idx].copy(),
                    new_end,
                )
            )
        p.promise_begin_h[idx] = new_end - 72.0
        p.promise_end_h[idx] = new_end
        p.date_changes[idx] += 1

    # The buyer collects the parcel (or the courier hands it over).
    was_arrived = open_ & arrived
    collect_rate = np.where(p.courier, dyn.courier_per_hour, dyn.pickup_per_hour)
    deliver = was_arrived & (rng.random(n) < 1.0 - np.exp(-collect_rate * dt))
    deliver_at = np.fmax(_jitter(rng, t, dt, n), p.arrived_h)

    # Deadlines that end a posting for sure.
    never_shipped = (
        open_
        & np.isnan(p.handed_h)
        & (t - p.ordered_h > dyn.shipping_deadline_hours + dyn.ozon_cancel_after_deadline_hours)
    )
    given_up = moving & (t - p.promise_end_h > dyn.lost_after_promise_days * 24.0)

    if survival is not None and buyer_prob is not None:
        # Same precedence as the sampled branch: a delivery or a deadline in this step wins.
        alive = open_ & (survival > 0) & ~deliver & ~never_shipped & ~given_up
        buyer_prob += np.where(alive, survival * p_buyer, 0.0)
        survival *= np.where(alive, np.clip(1.0 - p_buyer - p_other, 0.0, 1.0), 1.0)
        survival[never_shipped | given_up] = 0.0
        p.outcome = np.where(deliver, DELIVERED, p.outcome)
        p.outcome = np.where(never_shipped, OZON_CANCELLED, p.outcome)
        p.outcome = np.where(given_up, DELIVERY_CANCELLED, p.outcome)
        p.closed_h = np.where(p.outcome != OPEN, np.fmin(p.closed_h, t + dt), p.closed_h)
        return

    u = rng.random(n)
    cancel_at = _jitter(rng, t, dt, n)
    buyer_cancel = open_ & (u < p_buyer)
    other_cancel = open_ & ~buyer_cancel & (u < p_buyer + p_other)
    other_kind = np.where(
        rng.random(n) * (seller + lost) < seller, SELLER_CANCELLED, DELIVERY_CANCELLED
    )

    outcome = p.outcome.copy()
    closed = p.closed_h.copy()
    outcome = np.where(deliver, DELIVERED, outcome)
    closed = np.where(deliver, deliver_at, closed)
    for mask, kind in (
        (never_shipped, OZON_CANCELLED),
        (given_up, DELIVERY_CANCELLED),
        (buyer_cancel & ~deliver, BUYER_CANCELLED),
    ):
        take = mask & (outcome == OPEN)
        outcome = np.where(take, kind, outcome)
        closed = np.where(take, cancel_at, closed)
    take = other_cancel & (outcome == OPEN)
    outcome = np.where(take, other_kind, outcome)
    closed = np.where(take, cancel_at, closed)
    if rec is not None:
        done = np.flatnonzero(deliver & (outcome == DELIVERED))
        rec.states.append((pop.ids[done], closed[done], "posting_delivered"))
    p.outcome, p.closed_h = outcome, closed
