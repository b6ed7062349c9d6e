"""The history as plain columns: what the one feature definition (:mod:`core.features`) reads.

Two sources fill the same :class:`HistoryColumns`:

- :meth:`HistoryColumns.from_tables` reads ingestion's normalised tables (training, the nightly
  batch, the service's reference route). A column is converted when a feature first reads it,
  and an event kind is selected once, so a family pays only for what it reads.
- the service's request lane (:mod:`serving.request_lane`) writes the one posting of a REST
  request straight into columns, from the values ingestion's parsers give, without a DataFrame.

Three kinds of column, whatever the source:

- **times**: int64 UTC nanoseconds, :data:`NAT_NS` where unknown;
- **numbers**: float64, NaN where unknown (booleans are 1.0 / 0.0);
- **keys**: ids, codes and names as the source holds them: pandas arrays (``string``,
  ``Int64``) from the tables, object arrays (``None`` where missing) from a request. The key
  helpers below accept both and give the same result for the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.point_in_time import NAT_NS, plain_keys, to_ns
from core.tables import HistoryTables

TIME, NUMBER, KEY = "time", "number", "key"

POSTING_FIELDS: dict[str, str] = {
    "posting_number": KEY,
    "ordered_at": TIME,
    "shipment_deadline_at": TIME,
    "handed_over_at": TIME,
    "promised_delivery_begin_at": TIME,
    "promised_delivery_end_at": TIME,
    "carrier_id": KEY,
    "region": KEY,
    "payment_type": KEY,
    "delivery_type": KEY,
    "is_premium": NUMBER,
    "is_legal": NUMBER,
    "customer_id": KEY,
}
ITEM_FIELDS: dict[str, str] = {
    "posting_number": KEY,
    "line_no": NUMBER,
    "sku": KEY,
    "offer_id": KEY,
    "quantity": NUMBER,
    "unit_price": NUMBER,
    "currency_code": KEY,
}
# What the features read of each event kind; every event has its time ``at``.
EVENT_FIELDS: dict[str, dict[str, str]] = {
    "state_change": {"at": TIME, "posting_number": KEY, "state": KEY},
    "cancellation": {"at": TIME, "posting_number": KEY},
    "delivery_date_change": {
        "at": TIME,
        "posting_number": KEY,
        "delivery_begin_at": TIME,
        "delivery_end_at": TIME,
        "old_delivery_begin_at": TIME,
        "old_delivery_end_at": TIME,
    },
    "card_edit": {"at": TIME, "offer_id": KEY},
    "price": {
        "at": TIME,
        "offer_id": KEY,
        "price": NUMBER,
        "old_price": NUMBER,
        "currency_code": KEY,
    },
    "carrier_scan": {"at": TIME, "posting_number": KEY},
}

Array = np.ndarray | pd.api.extensions.ExtensionArray


class Columns:
    """Equal-length named columns, each read (and kept) the first time it is asked for."""

    def __init__(self, length: int, read: Callable[[str], Array] | Mapping[str, Array]) -> None:
        self.length = length
        if isinstance(read, Mapping):
            self._cache: dict[str, Array] = dict(read)
            self._read: Callable[[str], Array] | None = None
        else:
            self._cache = {}
            self._read = read

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, name: str) -> Array:
        values = self._cache.get(name)
        if values is None:
            if self._read is None:
                raise KeyError(name)
            values = self._cache[name] = self._read(name)
        return values

    def take(self, positions: np.ndarray) -> Columns:
        """The rows at ``positions``, in that order."""
        positions = np.asarray(positions, dtype="int64")
        return Columns(len(positions), lambda name: self[name][positions])


def _read_column(frame: pd.DataFrame, name: str, kind: str) -> Array:
    """A table column in the form of its kind (see the module docstring)."""
    column = frame[name]
    if kind == TIME:
        return to_ns(column)
    if kind == NUMBER:
        if column.dtype == "float64":
            return column.to_numpy()
        return column.to_numpy(dtype="float64", na_value=np.nan)
    return column.array


def _frame_columns(frame: pd.DataFrame, fields: Mapping[str, str]) -> Columns:
    return Columns(len(frame), lambda name: _read_column(frame, name, fields[name]))


@dataclass
class HistoryColumns:
    """A seller's history as the features read it: postings, product lines, events by kind.

    ``collecting_since`` maps a tuple of event kinds to the earliest time of any event of those
    kinds (:data:`NAT_NS` for none), or to one such time per posting when the columns hold
    several independent histories (the requests scored together); :meth:`first_event_ns` computes
    the single value from the events when it is not given.
    """

    postings: Columns
    items: Columns
    events_by_kind: Mapping[str, Columns]
    collecting_since: dict[tuple[str, ...], int | np.ndarray] = field(default_factory=dict)

    def events(self, kind: str) -> Columns:
        """Events of ``kind`` whose time is known."""
        return self.events_by_kind[kind]

    def first_event_ns(self, kinds: tuple[str, ...]) -> int | np.ndarray:
        """The earliest time of any event of ``kinds`` (:data:`NAT_NS` for none); one per posting
        when the columns hold the requests scored together."""
        if kinds not in self.collecting_since:
            times = [self.events(kind)["at"] for kind in kinds]
            earliest = [int(at.min()) for at in times if len(at)]
            self.collecting_since[kinds] = min(earliest) if earliest else NAT_NS
        return self.collecting_since[kinds]

    @classmethod
    def from_tables(cls, tables: HistoryTables) -> HistoryColumns:
        """The normalised tables as columns, converted as they are read."""
        events = tables.events
        kind = events["kind"].astype("string")
        timed = events["at"].notna().to_numpy()
        by_kind = {}
        for name, fields in EVENT_FIELDS.items():
            positions = np.flatnonzero(kind.eq(name).to_numpy(dtype=bool, na_value=False) & timed)
            by_kind[name] = _frame_columns(events, fields).take(positions)
        return cls(
            postings=_frame_columns(tables.postings, POSTING_FIELDS),
            items=_frame_columns(tables.items, ITEM_FIELDS),
            events_by_kind=by_kind,
        )


# --- keys -----------------------------------------------------------------------------------


def is_missing(values: Array) -> np.ndarray:
    """True where a key is missing (None, NA)."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    return np.asarray(pd.isna(values), dtype=bool)


def take_keys(values: Array, rows: np.ndarray) -> Array:
    """``values[rows]``, missing where ``rows`` is -1, in the representation of ``values``."""
    rows = np.asarray(rows, dtype="int64")
    if isinstance(values, np.ndarray):
        out = np.empty(len(rows), dtype=object)
        found = rows >= 0
        out[found] = values[rows[found]]
        out[~found] = None
        return out
    return values.take(rows, allow_fill=True)


def key_text(values: Array) -> Array:
    """Keys as text (an id 123 as ``"123"``), missing kept missing."""
    if isinstance(values, np.ndarray):
        return np.array(
            [None if v is None else v if type(v) is str else str(v) for v in values], dtype=object
        )
    return pd.array(values, copy=False).astype("string")


def sort_codes(values: Array) -> np.ndarray:
    """Integer codes that sort as the keys do, missing keys last (as ``sort_values`` puts NA)."""
    plain = plain_keys(values)
    if plain is not None:
        rank = {key: code for code, key in enumerate(sorted({k for k in plain if k is not None}))}
        return np.array([len(rank) if k is None else rank[k] for k in plain], dtype="int64")
    codes, uniques = pd.factorize(values, sort=True, use_na_sentinel=True)
    codes = np.asarray(codes, dtype="int64")
    return np.where(codes < 0, len(uniques), codes)


def lookup_keys(values: Array) -> Array | list[Any]:
    """Keys as :meth:`core.aggregates.CountsIndex.codes` reads them fastest: a request's object
    array as a list (looked up key by key), a table's pandas array as it is."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return values.tolist()
    return values


def map_keys(values: Array, mapping: Mapping[Any, float]) -> np.ndarray:
    """``mapping[key]`` per key as floats, NaN for a missing key or one ``mapping`` lacks.

    Each distinct key is looked up once (millions of rows, a few dozen distinct values).
    """
    plain = plain_keys(values)
    if plain is not None:
        return np.array(
            [np.nan if key is None else mapping.get(key, np.nan) for key in plain], dtype="float64"
        )
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    table = np.array([mapping.get(key, np.nan) for key in uniques] + [np.nan], dtype="float64")
    return table[np.asarray(codes, dtype="int64")]  # a missing key has code -1: the NaN at the end
