"""What the feature families share for one batch of moments (:class:`FeatureContext`), and the
small numeric helpers they all use."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from core.aggregates import HistoryAggregates
from core.columns import (
    Array,
    Columns,
    HistoryColumns,
    lookup_keys,
    sort_codes,
    take_keys,
)
from core.point_in_time import NAT_NS, NS_PER_HOUR, earliest_ns, gather, positions_of
from core.tables import PUSH_KINDS, SCAN_KINDS

# --- small numeric helpers --------------------------------------------------------------------


def hours_between(later_ns: np.ndarray, earlier_ns: np.ndarray) -> np.ndarray:
    """(later - earlier) in hours, NaN where either is NaT; exact integer subtraction first."""
    valid = (later_ns != NAT_NS) & (earlier_ns != NAT_NS)
    delta = np.where(valid, later_ns, 0) - np.where(valid, earlier_ns, 0)
    return np.where(valid, delta / NS_PER_HOUR, np.nan)


def expand_rows(group_of_moment: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair each moment with every row of its group, rows being sorted by group.

    ``counts[g]`` is the number of rows of group ``g``. Returns (moment, row) positions; moments
    of group -1 get no rows.
    """
    starts = np.cumsum(counts) - counts
    moments = np.flatnonzero(group_of_moment >= 0)
    groups = group_of_moment[moments]
    per_moment = counts[groups]
    moment_idx = np.repeat(moments, per_moment)
    offset = np.arange(len(moment_idx)) - np.repeat(np.cumsum(per_moment) - per_moment, per_moment)
    return moment_idx, np.repeat(starts[groups], per_moment) + offset


def _collected_at(first_ns: int | np.ndarray, as_of_ns: np.ndarray) -> np.ndarray:
    """Whether an input first seen at ``first_ns`` (per moment, or one time for all) was being
    collected at each ``as_of``."""
    first_ns = np.asarray(first_ns, dtype="int64")
    return (first_ns != NAT_NS) & (as_of_ns >= first_ns)


def _earliest(first_ns: int | np.ndarray, other_ns: int) -> int | np.ndarray:
    """:func:`earliest_ns` of a time per posting (or one) and one other time."""
    if np.ndim(first_ns) == 0:
        return earliest_ns(int(first_ns), other_ns)
    if other_ns == NAT_NS:
        return first_ns
    return np.where(first_ns == NAT_NS, other_ns, np.minimum(first_ns, other_ns))


# --- the shared context -----------------------------------------------------------------------


class FeatureContext:
    """What the feature families share for one batch of moments, each part computed once.

    Moments are addressed by position 0..n-1; ``posting_row`` is the moment's posting's position
    in ``history.postings`` (-1 for a posting the history does not hold).
    """

    def __init__(
        self,
        history: HistoryColumns,
        posting_numbers: Array,
        as_of_ns: np.ndarray,
        aggregates: HistoryAggregates,
    ) -> None:
        self.history = history
        self.aggregates = aggregates
        self.n = len(as_of_ns)
        self.as_of_ns = as_of_ns
        self.posting_numbers = history.postings["posting_number"]
        self.posting_row = positions_of(self.posting_numbers, posting_numbers)
        self.ordered_ns = self.posting_ns("ordered_at")
        self._event_rows_by_kind: dict[str, np.ndarray] = {}

    def posting_ns(self, column: str) -> np.ndarray:
        """A timestamp column of each moment's posting, as int64 ns (NaT for unknown postings)."""
        return gather(self.history.postings[column], self.posting_row, fill=NAT_NS)

    def posting_values(self, column: str) -> Array:
        """A key column of each moment's posting, missing for unknown postings."""
        return take_keys(self.history.postings[column], self.posting_row)

    def posting_floats(self, column: str) -> np.ndarray:
        """A number column of each moment's posting, NaN for unknown postings."""
        return gather(self.history.postings[column], self.posting_row)

    def events_of(self, kind: str) -> Columns:
        """Events of one kind with a known time."""
        return self.history.events(kind)

    def event_posting_rows(self, kind: str) -> np.ndarray:
        """The posting row of each of :meth:`events_of` ``kind`` (-1 for unknown postings)."""
        if kind not in self._event_rows_by_kind:
            numbers = self.events_of(kind)["posting_number"]
            self._event_rows_by_kind[kind] = positions_of(self.posting_numbers, numbers)
        return self._event_rows_by_kind[kind]

    def _collecting_since(self, kinds: tuple[str, ...]) -> int | np.ndarray:
        """Since when the shop archives events of ``kinds``, per moment (or one time for all):
        the earliest such event of the history or of the history the aggregates learned (a
        REST request holds one posting's events only, and a posting without scans yet is still
        one of a shop that collects them).
        """
        since = _earliest(
            self.history.first_event_ns(kinds), self.aggregates.collecting_since(kinds)
        )
        if np.ndim(since) == 0:
            return since
        return gather(since, self.posting_row, NAT_NS)

    @cached_property
    def pushes_collected(self) -> np.ndarray:
        """Per moment: pushes were being archived at ``as_of``."""
        return _collected_at(self._collecting_since(PUSH_KINDS), self.as_of_ns)

    @cached_property
    def scans_collected(self) -> np.ndarray:
        """Per moment: carrier scans were being collected at ``as_of``."""
        return _collected_at(self._collecting_since(SCAN_KINDS), self.as_of_ns)

    @cached_property
    def items(self) -> Columns:
        """Product lines of known postings in a canonical order (posting, then line).

        The canonical order makes every per-moment sum add its lines in the same order whatever
        the order of the input rows, so shuffled tables give identical numbers. ``posting_row``
        and ``value`` (unit price times quantity) are added.
        """
        items = self.history.items
        posting_row = positions_of(self.posting_numbers, items["posting_number"])
        known = np.flatnonzero(posting_row >= 0)
        lines = items.take(known)
        posting_row = posting_row[known]
        order = np.lexsort(
            (
                sort_codes(lines["currency_code"]),
                lines["unit_price"],
                lines["quantity"],
                sort_codes(lines["sku"]),
                sort_codes(lines["offer_id"]),
                lines["line_no"],
                posting_row,
            )
        )
        ordered = lines.take(order)
        quantity, unit_price = ordered["quantity"], ordered["unit_price"]
        return Columns(
            len(order),
            {
                "posting_row": posting_row[order],
                "line_no": ordered["line_no"],
                "offer_id": ordered["offer_id"],
                "sku": ordered["sku"],
                "quantity": quantity,
                "unit_price": unit_price,
                "currency_code": ordered["currency_code"],
                "value": unit_price * quantity,
            },
        )

    @cached_property
    def moment_lines(self) -> tuple[np.ndarray, np.ndarray]:
        """(moment, item) position pairs: every product line of every moment's posting."""
        counts = np.bincount(self.items["posting_row"], minlength=len(self.posting_numbers))
        return expand_rows(self.posting_row, counts)

    @cached_property
    def history_values(self) -> dict[str, np.ndarray]:
        """The learned history aggregates looked up at each moment (point in time)."""
        moment_idx, item_idx = self.moment_lines
        return self.aggregates.lookup_columns(
            carrier_id=lookup_keys(self.posting_values("carrier_id")),
            region=lookup_keys(self.posting_values("region")),
            customer_id=lookup_keys(self.posting_values("customer_id")),
            ordered_ns=self.ordered_ns,
            as_of_ns=self.as_of_ns,
            line_row=moment_idx,
            line_sku=lookup_keys(self.items["sku"][item_idx]),
            line_weight=self.items["value"][item_idx],
        )
