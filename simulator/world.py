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
probability with far fewer rollouts than sampling the cancellation itself. The buyer's hazard is
a sum of named terms (:data:`HAZARD_TERMS`), one or two per mechanism, so that the truth causes
(:mod:`simulator.causes`) can follow the hazard with one mechanism switched off along the same
paths.

Time is in hours since the simulation start, as float64. The carriers, regions and rates the
step applies are :mod:`simulator.parameters`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

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


# The terms of the buyer's log-hazard, in the order they are added up (after the base rate).
HAZARD_TERMS = (
    "region",
    "cod",
    "premium",
    "repeat",
    "fickleness",
    "remorse",
    "price_drop",
    "promo_visible",
    "quiet",
    "late",
    "not_shipped",
    "card_edit",
    "date_change",
)


def price_terms(
    pop: Population, t: float, dyn: Dynamics, reference: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The price-fall terms: the value-weighted drop below ``reference`` (per line; default the
    price paid) and whether a promotion the buyer did not buy in shows that drop."""
    p, lines = pop.postings, pop.lines
    n = len(p.ordered_h)
    paid = lines.paid if reference is None else reference
    current = pop.offers.effective_price(t)[lines.offer]
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.clip(1.0 - current / paid, 0.0, None)
    drop = np.nan_to_num(drop)
    in_promo = (pop.offers.promo_until[lines.offer] > t) & ~lines.promo_at_purchase
    price_drop = np.bincount(lines.posting, pop.line_weight * drop, minlength=n)
    promo_visible = np.bincount(lines.posting, in_promo & (drop > 0), minlength=n) > 0
    return dyn.price_drop_effect * price_drop, dyn.promo_visible_effect * promo_visible


def quiet_term(
    p: Postings, t: float, dyn: Dynamics, since: float | np.ndarray | None = None
) -> np.ndarray:
    """Tracking silence of a parcel in transit beyond what buyers tolerate; silence before
    ``since`` (per posting, or one hour) does not count (None: all of it)."""
    handed = ~np.isnan(p.handed_h)
    in_transit = handed & np.isnan(p.arrived_h)
    last = p.last_activity_h if since is None else np.fmax(p.last_activity_h, since)
    quiet_days = np.where(in_transit, (t - last) / 24.0 - dyn.quiet_after_days, 0.0)
    return dyn.quiet_effect_per_day * np.clip(quiet_days, 0.0, dyn.quiet_cap_days)


def lateness_terms(
    p: Postings,
    t: float,
    dyn: Dynamics,
    since: float | None = None,
    changes_before: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Days past the promised end (counted from ``since`` at the earliest) and the promise's
    moves (less ``changes_before``) of a parcel not yet at the pickup point."""
    end = p.promise_end_h if since is None else np.fmax(p.promise_end_h, since)
    late_days = np.where(~np.isnan(p.arrived_h), 0.0, (t - end) / 24.0)
    changes = p.date_changes if changes_before is None else p.date_changes - changes_before
    return (
        dyn.late_effect_per_day * np.clip(late_days, 0.0, dyn.late_cap_days),
        dyn.date_change_effect * np.minimum(changes, 3),
    )


def waiting_term(p: Postings, t: float, dyn: Dynamics, since: float | None = None) -> np.ndarray:
    """Waiting for the handover beyond what buyers tolerate, the wait counted from the order
    (or from ``since`` when later)."""
    age = t - p.ordered_h if since is None else t - np.fmax(p.ordered_h, since)
    unshipped_days = np.where(
        ~np.isnan(p.handed_h), 0.0, (age - dyn.not_shipped_after_hours) / 24.0
    )
    return dyn.not_shipped_effect_per_day * np.clip(unshipped_days, 0.0, dyn.not_shipped_cap_days)


def card_edit_term(
    pop: Population, dyn: Dynamics, edits_before: np.ndarray | None = None
) -> np.ndarray:
    """Edits of the bought offers' cards since ``edits_before`` (per line; default the count at
    purchase), at most three."""
    lines = pop.lines
    before = lines.edits_at_purchase if edits_before is None else edits_before
    edits = np.bincount(
        lines.posting, pop.offers.edits[lines.offer] - before, minlength=len(pop.postings.ordered_h)
    )
    return dyn.card_edit_effect * np.minimum(edits, 3)


def buyer_hazard_terms(pop: Population, t: float, dyn: Dynamics) -> dict[str, np.ndarray]:
    """Every term of the buyer's log-hazard at hour ``t``, by name (:data:`HAZARD_TERMS`)."""
    p = pop.postings
    price_drop, promo_visible = price_terms(pop, t, dyn)
    late, date_change = lateness_terms(p, t, dyn)
    return {
        "region": REGION_SHIFT[p.region],
        "cod": dyn.cod_effect * p.cod,
        "premium": dyn.premium_effect * p.premium,
        "repeat": dyn.repeat_buyer_effect * p.repeat,
        "fickleness": p.fickleness,
        "remorse": dyn.remorse_effect * np.exp(-(t - p.ordered_h) / dyn.remorse_hours),
        "price_drop": price_drop,
        "promo_visible": promo_visible,
        "quiet": quiet_term(p, t, dyn),
        "late": late,
        "not_shipped": waiting_term(p, t, dyn),
        "card_edit": card_edit_term(pop, dyn),
        "date_change": date_change,
    }


def sum_log_hazard(terms: dict[str, np.ndarray], arrived: np.ndarray, dyn: Dynamics) -> np.ndarray:
    """The log-hazard from its terms, added in the order of :data:`HAZARD_TERMS`: the same
    terms always give the same bits, so a variant that changes no term changes nothing."""
    eta = np.log(dyn.buyer_base_per_hour)
    for name in HAZARD_TERMS:
        eta = eta + terms[name]
    return np.where(arrived, eta + np.log(dyn.at_pickup_factor), eta)


def buyer_log_hazard(pop: Population, t: float, dyn: Dynamics) -> np.ndarray:
    """Log of the buyer's cancellation hazard for every posting at hour ``t``."""
    terms = buyer_hazard_terms(pop, t, dyn)
    return sum_log_hazard(terms, ~np.isnan(pop.postings.arrived_h), dyn)


class HazardVariants(Protocol):
    """Other buyer hazards followed along the same paths as the real one (the truth causes).

    ``log_hazards`` gives, from the real hazard's terms at the start of a step, the
    ``(k, postings)`` log-hazards of the ``k`` variants; ``survival`` and ``buyer_prob`` are
    their own Rao-Blackwellised accumulators, of the same shape.
    """

    survival: np.ndarray
    buyer_prob: np.ndarray

    def log_hazards(
        self, pop: Population, t: float, dyn: Dynamics, terms: dict[str, np.ndarray]
    ) -> np.ndarray: ...


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


class PairedGenerator:
    """Common random numbers for a rollout made of two halves: the real paths and the same
    paths with one change (the carrier).

    Every draw the step function makes for all posting rows (``posting_rows``, kept up to date
    as the rollout shrinks) or all offer rows (``offer_rows``) is drawn for the first half and
    repeated for the second, so row ``i`` of each half meets the same chances and the two
    differ only by what the change does. Draws of other sizes (the few postings whose date Ozon
    moves in a step) are drawn as they come. Each half on its own gets independent draws of the
    right law. :meth:`uniform_for` draws for chosen rows: a row of either half gets its pair's
    number.
    """

    def __init__(self, rng: np.random.Generator, posting_rows: int, offer_rows: int) -> None:
        self.rng = rng
        self.posting_rows = posting_rows
        self.offer_rows = offer_rows

    def _draw(self, size: int, draw: Callable[[int], np.ndarray]) -> np.ndarray:
        if size in (self.posting_rows, self.offer_rows):
            half = draw(size // 2)
            return np.concatenate([half, half])
        return draw(size)

    def random(self, size: int) -> np.ndarray:
        return self._draw(size, self.rng.random)

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        return self._draw(size, lambda k: self.rng.uniform(low, high, k))

    def normal(self, loc: float, scale: float, size: int) -> np.ndarray:
        return self._draw(size, lambda k: self.rng.normal(loc, scale, k))

    def gamma(self, shape: float, scale: float, size: int) -> np.ndarray:
        return self._draw(size, lambda k: self.rng.gamma(shape, scale, k))

    def exponential(self, scale: np.ndarray) -> np.ndarray:
        scale = np.asarray(scale, dtype="float64")
        return scale * self._draw(scale.size, self.rng.standard_exponential)

    def uniform_for(self, low: float, high: float, rows: np.ndarray) -> np.ndarray:
        half = self.posting_rows // 2
        return self.rng.uniform(low, high, half)[rows % half]


def _uniform_for(
    rng: np.random.Generator | PairedGenerator, low: float, high: float, rows: np.ndarray
) -> np.ndarray:
    """Uniform draws for the posting rows ``rows`` (as many draws as rows from a Generator)."""
    if isinstance(rng, PairedGenerator):
        return rng.uniform_for(low, high, rows)
    return rng.uniform(low, high, rows.size)


def _scan_gap(
    arrays: dict[str, np.ndarray],
    carrier: np.ndarray,
    dyn: Dynamics,
    rng: np.random.Generator | PairedGenerator,
) -> np.ndarray:
    shape = dyn.scan_regularity
    return arrays["scan_every"][carrier] * rng.gamma(shape, 1.0 / shape, carrier.size)


def _jitter(rng: np.random.Generator | PairedGenerator, t: float, dt: float, n: int) -> np.ndarray:
    return t + rng.uniform(0.0, dt, n)


def advance_offers(
    offers: Offers,
    t: float,
    dt: float,
    dyn: Dynamics,
    rng: np.random.Generator | PairedGenerator,
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
    rng: np.random.Generator | PairedGenerator,
    rec: Recorder | None = None,
    survival: np.ndarray | None = None,
    buyer_prob: np.ndarray | None = None,
    variants: HazardVariants | None = None,
) -> None:
    """Move every open posting of ``pop`` from hour ``t`` to ``t + dt``.

    With ``survival``/``buyer_prob`` given (truth rollouts), cancellations are not sampled: each
    path accumulates the probability that the buyer cancels within the step, given it survived
    so far, and survival shrinks by the step's total cancellation probability. Deliveries and
    deadlines are still sampled or applied, since they end the path. ``variants`` (with them)
    are other buyer hazards accumulated the same way along the very same paths: the buyer's
    hazard changes no state, so one rollout serves them all and draws no extra random number.
    """
    advance_offers(pop.offers, t, dt, dyn, rng, rec)
    p = pop.postings
    open_ = p.outcome == OPEN
    n = len(open_)
    carrier = p.carrier

    # Hazards use the state at the start of the step.
    terms = buyer_hazard_terms(pop, t, dyn)
    eta = sum_log_hazard(terms, ~np.isnan(p.arrived_h), dyn)
    buyer = np.exp(eta)
    seller, lost = other_cancel_hazards(pop, t, dyn)
    p_buyer = 1.0 - np.exp(-buyer * dt)
    p_other = 1.0 - np.exp(-(seller + lost) * dt)
    p_variant = None
    if variants is not None and survival is not None:
        # Where a variant's hazard is the real one, so is its step probability (bit for bit).
        variant_eta = variants.log_hazards(pop, t, dyn, terms)
        p_variant = np.broadcast_to(p_buyer, variant_eta.shape).copy()
        differs = variant_eta != eta
        p_variant[differs] = 1.0 - np.exp(-np.exp(variant_eta[differs]) * dt)

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
        at = t + _uniform_for(rng, 0.0, dt, idx)
        new_end = at + _uniform_for(rng, *dyn.date_change_shift_days, idx) * 24.0
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
        if variants is not None and p_variant is not None:
            # The real hazard's arithmetic, in place (the variants are k times as many rows):
            # the same bits wherever a variant's hazard is the real one.
            ended = ~(open_ & ~deliver & ~never_shipped & ~given_up)
            gained = variants.survival * p_variant
            np.copyto(gained, 0.0, where=ended)
            variants.buyer_prob += gained
            np.subtract(1.0, p_variant, out=p_variant)
            p_variant -= p_other
            np.clip(p_variant, 0.0, 1.0, out=p_variant)
            np.copyto(p_variant, 1.0, where=ended)
            variants.survival *= p_variant
            variants.survival[:, never_shipped | given_up] = 0.0
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
