"""Why each open posting's buyer may cancel: every mechanism's share of its true probability.

The truth (:func:`simulator.shop.true_probabilities`) says how likely the buyer is to cancel;
this module says why, in the playbook's cause codes (:data:`core.counterfactuals.CAUSES`), so
that the reasons the model gives can be checked against the world's own causes.

A mechanism's **contribution** to a posting's true probability is

    contribution = P(true) − P(true with the mechanism switched off)

Switching a mechanism off resets what it has built up by the export moment: the buyer's hazard
stops seeing the problem as it stands then, and sees whatever the world does afterwards as
before (a new price fall, a new silence, more lateness all still count). A mechanism whose
state is clean at the export moment therefore contributes exactly 0, and the contribution is
the part of the risk that fixing the problem *now* would remove — the question a reason
answers. Contributions of several mechanisms need not add up to P (they interact through the
hazard's exponential and through survival).

=====================  ==========================================  ===================
mechanism              switched off at the export moment           cause code
=====================  ==========================================  ===================
price fall             the buyer compares later prices with the    ``price_drop``
(``price_drop``,       price in force at the export moment when
``promo_visible``)     it is below the one paid, not with the
                       price paid: the fall so far stops counting
tracking blackout      silence is counted from the export moment   ``tracking_quiet``
(``quiet``)            (as if a scan had come in then), and the
                       rest of a blackout running then keeps no
                       silence either: the buyer sees the parcel
                       again when it ends, as in the real world
lateness and moved     lateness is counted from the export moment  ``late_delivery``
dates (``late``,       and the promise's moves before it do not
``date_change``)       count
waiting for the        the wait is counted from the export moment  ``not_shipped``
handover               (as if ordered then)
(``not_shipped``)
card edits             edits before the export moment do not       ``listing_changed``
(``card_edit``)        count
early remorse          no remorse term at all                      ``early_remorse``
(``remorse``)
payment, region,       prepaid, the shop's usual region's shift,   ``buyer_profile``
buyer (``cod``,        a returning buyer, no hidden fickleness
``region``,
``repeat``,
``fickleness``)
carrier (transit       the shop's usual carrier's speed, scan      ``slow_carrier``
speed, scan rhythm,    rhythm and blackout rate and length from
blackouts)             the export moment on, for a parcel not yet
                       at the pickup point
=====================  ==========================================  ===================

Not causes: the premium buyer's lower hazard and the lower hazard once the parcel waits at the
pickup point only ever lower the risk; they stay on in every variant. The blackout running at
the export moment belongs to the tracking blackout, not to the carrier: in the carrier's variant
its remaining length has the same law as in the real world.

The first seven mechanisms act on the buyer's hazard only, which changes no state: their
switched-off hazards (:class:`SwitchedOff`) are followed along the very rollouts of the truth,
so each difference is the mechanism's alone, exactly 0 where it cannot act, and costs no extra
random number. The carrier changes the world itself (how the parcel travels), so it has a
rollout of its own: each posting's paths with its own carrier and with the usual one, side by
side, driven by common random numbers (:class:`simulator.world.PairedGenerator`, from a
separate stream), and its contribution is the difference of the two. Postings already on the
usual carrier or at the pickup point are not rolled out: their contribution is 0.

``dominant_cause`` is the cause with the largest contribution, ``none`` when no contribution
reaches :data:`DOMINANT_MIN`. Contributions are Monte-Carlo estimates like the truth itself:
between two rollout seeds on the demo shop (64 rollouts) they differ by a standard deviation
of about 0.005-0.007 (price, card edits, buyer), 0.011 (tracking: each rollout draws the rest
of a running blackout) and 0.021 (carrier), against 0.027 for the true probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.counterfactuals import CAUSES
from simulator.parameters import CARRIERS, REGION_SHIFT, Dynamics
from simulator.world import (
    HAZARD_TERMS,
    Population,
    card_edit_term,
    lateness_terms,
    price_terms,
    quiet_term,
    waiting_term,
)

# The hazard-only mechanisms, by their cause code, in the order SwitchedOff holds them.
SWITCHED_OFF = (
    "price_drop",
    "tracking_quiet",
    "late_delivery",
    "not_shipped",
    "listing_changed",
    "early_remorse",
    "buyer_profile",
)
CARRIER_CAUSE = "slow_carrier"
# A contribution below this is no cause: the posting's dominant cause is then "none".
DOMINANT_MIN = 0.01
NO_CAUSE = "none"

__all__ = [
    "CARRIER_CAUSE",
    "CAUSES",
    "DOMINANT_MIN",
    "NO_CAUSE",
    "SWITCHED_OFF",
    "SwitchedOff",
    "UsualLevels",
    "build_cause_frame",
    "contribution_columns",
]


def contribution_columns() -> list[str]:
    """``contribution_<cause>`` for every cause code, in the playbook's order."""
    return [f"contribution_{cause}" for cause in CAUSES]


@dataclass(frozen=True)
class UsualLevels:
    """The shop's usual region and carrier (their most frequent level among all orders): the
    baseline the buyer-profile and carrier mechanisms are switched to, as the model's
    counterfactuals compare with the typical order of the training data."""

    region: int
    carrier: int

    @classmethod
    def of_orders(cls, region: np.ndarray, carrier: np.ndarray) -> UsualLevels:
        return cls(
            region=int(np.bincount(region, minlength=len(REGION_SHIFT)).argmax()),
            carrier=int(np.bincount(carrier, minlength=len(CARRIERS)).argmax()),
        )


class SwitchedOff:
    """The buyer's hazard with each hazard-only mechanism switched off (:data:`SWITCHED_OFF`).

    Built from the rollout population at the export moment ``t`` (after each replica has drawn
    the rest of a running blackout), whose state is then the state the mechanisms are reset
    at: the price each line could be bought at, the card edits and date moves so far, the end of
    the blackout running then. Every variant adds the real hazard's terms in the same order with
    only its own terms replaced, so a mechanism with nothing to reset gives the real hazard's
    bits.
    """

    def __init__(self, rollout: Population, t: float, usual: UsualLevels) -> None:
        lines, offers, postings = rollout.lines, rollout.offers, rollout.postings
        self.since = t
        # Silence counts from the export moment, or from the end of the blackout running then.
        running = postings.quiet_until > t
        self.quiet_since = np.where(running, postings.quiet_until, t)
        self.region_shift = float(REGION_SHIFT[usual.region])
        self.price_reference = np.fmin(lines.paid, offers.effective_price(t)[lines.offer])
        self.edits_before = offers.edits[lines.offer].copy()
        self.changes_before = postings.date_changes.copy()
        shape = (len(SWITCHED_OFF), len(postings.ordered_h))
        self.survival = np.ones(shape)
        self.buyer_prob = np.zeros(shape)

    def take(self, keep: np.ndarray, line_keep: np.ndarray) -> SwitchedOff:
        """The variants of the rollout rows ``keep`` (whose lines are ``line_keep``)."""
        taken = object.__new__(SwitchedOff)
        taken.since, taken.region_shift = self.since, self.region_shift
        taken.price_reference = self.price_reference[line_keep]
        taken.edits_before = self.edits_before[line_keep]
        taken.changes_before = self.changes_before[keep]
        taken.quiet_since = self.quiet_since[keep]
        taken.survival = self.survival[:, keep]
        taken.buyer_prob = self.buyer_prob[:, keep]
        return taken

    def log_hazards(
        self, pop: Population, t: float, dyn: Dynamics, terms: dict[str, np.ndarray]
    ) -> np.ndarray:
        p = pop.postings
        n = len(p.ordered_h)
        pickup = np.where(~np.isnan(p.arrived_h), np.log(dyn.at_pickup_factor), 0.0)
        # Running sums of the real terms: a variant starts from the sum before its first
        # replaced term and adds the rest in the same order (the same bits as a full sum).
        prefix = [np.log(dyn.buyer_base_per_hour)]
        for name in HAZARD_TERMS:
            prefix.append(prefix[-1] + terms[name])
        out = np.empty((len(SWITCHED_OFF), n))

        def variant(row: int, **changed: np.ndarray) -> None:
            first = min(HAZARD_TERMS.index(name) for name in changed)
            eta = prefix[first]
            for name in HAZARD_TERMS[first:]:
                eta = eta + changed.get(name, terms[name])
            out[row] = eta + pickup

        price_drop, promo_visible = price_terms(pop, t, dyn, self.price_reference)
        variant(0, price_drop=price_drop, promo_visible=promo_visible)
        variant(1, quiet=quiet_term(p, t, dyn, self.quiet_since))
        late, date_change = lateness_terms(p, t, dyn, self.since, self.changes_before)
        variant(2, late=late, date_change=date_change)
        variant(3, not_shipped=waiting_term(p, t, dyn, self.since))
        variant(4, card_edit=card_edit_term(pop, dyn, self.edits_before))
        zeros = np.zeros(n)
        variant(5, remorse=zeros)
        variant(
            6,
            region=np.full(n, self.region_shift),
            cod=zeros,
            repeat=np.full(n, dyn.repeat_buyer_effect),
            fickleness=zeros,
        )
        return out


def build_cause_frame(
    posting: np.ndarray, probability: np.ndarray, contributions: np.ndarray
) -> pd.DataFrame:
    """One row per posting: ``posting`` (its index in the shop), ``true_probability``, the
    ``contribution_<cause>`` columns (``contributions`` is postings x :data:`CAUSES`) and
    ``dominant_cause``."""
    contributions = np.asarray(contributions, dtype="float64")
    best = contributions.argmax(axis=1) if len(contributions) else np.empty(0, dtype=int)
    top = contributions[np.arange(len(best)), best]
    dominant = np.where(top >= DOMINANT_MIN, np.array(CAUSES, dtype=object)[best], NO_CAUSE)
    frame = pd.DataFrame({"posting": posting, "true_probability": probability})
    for column, values in zip(contribution_columns(), contributions.T, strict=True):
        frame[column] = values
    frame["dominant_cause"] = dominant.astype(object)
    return frame
