"""Column-wise converters from raw source values to the canonical dtypes.

Every converter takes a whole column (a list or Series of whatever the source held) and works
vectorised, with a narrower second pass only over the values the fast path could not read. The
ones that return a ``bad`` mask mark values that were *present* but unusable, so callers decide
whether that makes a record a reject (an order time, a price) or just a missing value (an
optional date). ``None`` and ``""`` count as absent everywhere: the API writes ``""`` for
"none". Columns of one Python type (the usual case) take a single C-speed pass; only mixed
columns pay for per-value type checks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.api.types import infer_dtype

from core.point_in_time import NAT_NS, from_ns
from core.tables import UTC_TS

# Naive dates in the seller-cabinet export are Moscow time, which has no DST since 2014.
MOSCOW = timezone(timedelta(hours=3))

# The cabinet export writes the first two (report API / cabinet download); the rest are
# the same dates with or without seconds, or without a time.
CABINET_DATE_FORMATS = (
    "%Y-%m-%d %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d.%m.%Y %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
    "%d.%m.%Y",
)

# No Ozon order was placed before this: an earlier order time is a placeholder or a broken clock
# (the REST service refuses the same, serving.validation.EARLIEST_ORDER_AT).
EARLIEST_ORDER_AT = pd.Timestamp("2000-01-01", tz="UTC")

# datetime64[ns] covers 1677..2262; anything outside cannot be stored and is unusable anyway.
_TS_MIN = pd.Timestamp("1678-01-01", tz="UTC")
_TS_MAX = pd.Timestamp("2261-12-31", tz="UTC")

Column = Sequence[Any] | pd.Series | np.ndarray

# Columns up to this long are read value by value by the canonical readers below (pandas' parsers
# cost a tenth of a millisecond a call whatever the length: what one posting's fields would pay);
# a column with any value they refuse, and every longer one, takes the vectorised parsers. Both
# give the same values (tests/test_serving_parity.py).
SHORT_COLUMN = 64


NS_PER_SECOND = 1_000_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_EXACT_FLOAT_INT = 2**53

# The canonical timestamps: a date, or a date and time to the second with an optional fraction
# (up to nanoseconds) and an optional "Z" or ±HH:MM offset. Naive means UTC, as in ingestion.
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?)?"
)
# Plain decimals as the Seller API writes prices ("1390.000000"); an optional minus sign.
_DECIMAL = re.compile(r"(-?)(\d{1,15})(?:\.(\d{1,12}))?")
_CANONICAL_YEARS = range(1900, 2201)


class NotCanonical(ValueError):
    """A value is not in its canonical form: the column converters read (and word) it."""


# --- one value in its canonical form ------------------------------------------------------------


def parse_timestamp(value: Any) -> int | None:
    """A canonical ISO-8601 timestamp as UTC nanoseconds; None when absent (null or blank).

    What :func:`build_utc_timestamps` gives for the values it accepts.
    """
    if value is None:
        return None
    if type(value) is not str:
        if isinstance(value, float) and math.isnan(value):
            return None
        raise NotCanonical
    return _parse_timestamp_text(value)


@lru_cache(maxsize=65_536)
def _parse_timestamp_text(value: str) -> int | None:
    # Cached: a seller sends the same price-log and push times with many requests.
    match = _TIMESTAMP.fullmatch(value)
    if match is None:
        if not value.strip():
            return None
        raise NotCanonical
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    year_number = int(year)
    if year_number not in _CANONICAL_YEARS:
        raise NotCanonical
    try:
        days = date(year_number, int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise NotCanonical from None
    seconds = days * 86_400
    nanos = 0
    if hour is not None:
        h, m, s = int(hour), int(minute), int(second)
        if h > 23 or m > 59 or s > 59:
            raise NotCanonical
        seconds += h * 3600 + m * 60 + s
        if fraction is not None:
            nanos = int(fraction.ljust(9, "0"))
        if offset is not None and offset != "Z":
            offset_hours, offset_minutes = int(offset[1:3]), int(offset[4:6])
            if offset_hours > 14 or offset_minutes > 59:
                raise NotCanonical
            shift = offset_hours * 3600 + offset_minutes * 60
            seconds -= shift if offset[0] == "+" else -shift
    return seconds * NS_PER_SECOND + nanos


def parse_decimal(value: Any) -> float | None:
    """A JSON number or a plain decimal string as a float; None when absent.

    What :func:`build_decimals` gives: booleans are not numbers, blank strings are absent.
    """
    if value is None:
        return None
    kind = type(value)
    if kind is float:
        if math.isnan(value):
            return None
        if math.isinf(value):
            raise NotCanonical
        return value
    if kind is int:
        if -_EXACT_FLOAT_INT < value < _EXACT_FLOAT_INT:
            return float(value)
        raise NotCanonical
    if kind is str:
        if _DECIMAL.fullmatch(value) is not None:
            return float(value)
        if not value.strip():
            return None
    raise NotCanonical


def parse_integer(value: Any) -> int | None:
    """An integer id or count; None when absent. What :func:`build_integers` gives for ints."""
    if value is None:
        return None
    if type(value) is int and _INT64_MIN <= value <= _INT64_MAX:
        return value
    if type(value) is str and not value.strip():
        return None
    raise NotCanonical


def parse_text(value: Any) -> str | None:
    """Free text or a code, stripped; None when absent or empty, as :func:`build_strings`."""
    if value is None:
        return None
    if type(value) is str:
        text = value
    elif isinstance(value, str | bool | int) or (isinstance(value, float) and math.isfinite(value)):
        text = str(value)
    else:
        return None
    text = text.strip()
    return text or None


def parse_bool(value: Any) -> bool | None:
    """A JSON boolean; anything else is unknown, as :func:`build_booleans`."""
    return value if type(value) is bool else None


def _read_short(values: Column, read: Any) -> list[Any] | None:
    """Every value of a short column by its canonical reader; None when the column is long or
    a value is not canonical."""
    if len(values) > SHORT_COLUMN:
        return None
    listed = values.tolist() if isinstance(values, pd.Series | np.ndarray) else values
    try:
        return [read(value) for value in listed]
    except NotCanonical:
        return None


def as_object_series(values: Column) -> pd.Series:
    """The values as an object Series with a clean 0..n-1 index."""
    if isinstance(values, pd.Series):
        return values.astype(object).reset_index(drop=True)
    if isinstance(values, np.ndarray) and values.dtype == object and values.ndim == 1:
        return pd.Series(values, dtype=object, copy=False)
    return pd.Series(list(values), dtype=object)


def _type_is(values: pd.Series, cls: type) -> np.ndarray:
    """Element-wise exact type test (bool is not int, str subclasses are not str)."""
    return np.fromiter((type(v) is cls for v in values), dtype=bool, count=len(values))


def build_present_mask(values: pd.Series) -> np.ndarray:
    """True where a value is given: not None/NaN and not ``""``."""
    present = values.notna().to_numpy(copy=True)
    if present.any():
        present &= (values != "").to_numpy(dtype=bool)
    return present


def _in_range(stamps: pd.Series) -> np.ndarray:
    return ((stamps >= _TS_MIN) & (stamps <= _TS_MAX)).to_numpy(dtype=bool, na_value=False)


def _fromisoformat_utc(value: Any) -> pd.Timestamp | None:
    """Second chance for one ISO-8601 value pandas' vectorised parser refused."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return pd.Timestamp(parsed).tz_convert("UTC")


def _to_utc_ns(stamps: pd.Series) -> pd.Series:
    """Aware timestamps as datetime64[ns, UTC]; values outside its range become NaT."""
    return stamps.where(_in_range(stamps)).astype(UTC_TS)


def build_utc_timestamps(values: Column) -> tuple[pd.Series, np.ndarray]:
    """Parse ISO-8601 values (``Z``, offsets, optional fractions) into UTC timestamps.

    Naive values are taken as UTC, which is what the Seller API and the side files mean.
    Returns the timestamps (NaT where absent or bad) and the mask of present-but-bad values.
    """
    short = _read_short(values, parse_timestamp)
    if short is not None:
        ns = np.array([NAT_NS if at is None else at for at in short], dtype="int64")
        return from_ns(ns), np.zeros(len(ns), dtype=bool)
    raw = as_object_series(values)
    present = build_present_mask(raw)
    if not present.any():
        return pd.Series(pd.NaT, index=raw.index, dtype=UTC_TS), present
    # Only strings are timestamps here; a number would be read as nanoseconds since 1970.
    text = raw if infer_dtype(raw, skipna=True) == "string" else raw.where(_type_is(raw, str))
    # pandas reads "now" and "today" as the moment it runs: a record would be dated by when it
    # was loaded. A timestamp starts with its year.
    text = text.where(text.str.match(r"\s*\d", na=False))
    parsed = _to_utc_ns(pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce"))
    retry = np.flatnonzero(present & parsed.isna().to_numpy())
    if len(retry):
        slow = pd.Series([_fromisoformat_utc(v) for v in raw.iloc[retry]], dtype=object)
        parsed.iloc[retry] = _to_utc_ns(pd.to_datetime(slow, utc=True)).to_numpy()
    return parsed, present & parsed.isna().to_numpy()


def build_cabinet_timestamps(values: Column) -> tuple[pd.Series, np.ndarray]:
    """Parse the cabinet export's naive Moscow-time dates into UTC.

    Both export styles (``2026-04-14 19:01:23`` and ``14.04.2026 19:01``) are accepted, with
    or without seconds or a time; values carrying an explicit offset are honoured as given.
    """
    raw = as_object_series(values)
    present = build_present_mask(raw)
    text = raw.where(present & _type_is(raw, str))
    local = pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns]")
    for fmt in CABINET_DATE_FORMATS:
        todo = np.flatnonzero(present & local.isna().to_numpy())
        if not len(todo):
            break
        local.iloc[todo] = pd.to_datetime(text.iloc[todo], format=fmt, errors="coerce").to_numpy()
    parsed = _to_utc_ns(local.dt.tz_localize(MOSCOW).dt.tz_convert("UTC"))
    left = np.flatnonzero(present & parsed.isna().to_numpy())
    if len(left):
        parsed.iloc[left] = build_utc_timestamps(raw.iloc[left])[0].to_numpy()
    return parsed, present & parsed.isna().to_numpy()


_NUMERIC_KINDS = frozenset(
    {"string", "integer", "floating", "mixed-integer-float", "decimal", "empty"}
)


def build_decimals(values: Column) -> tuple[pd.Series, np.ndarray]:
    """Parse decimal numbers given as numbers or strings (``"1390.000000"``, ``"1 390,50"``).

    Returns float64 values (NaN where absent or bad) and the present-but-bad mask. ``inf`` and
    negative values are numbers here; callers that need finite non-negative check that.
    """
    short = _read_short(values, parse_decimal)
    if short is not None:
        numbers = [np.nan if number is None else number for number in short]
        return pd.Series(numbers, dtype="float64"), np.zeros(len(short), dtype=bool)
    raw = as_object_series(values)
    present = build_present_mask(raw)
    if infer_dtype(raw, skipna=True) not in _NUMERIC_KINDS:
        # Booleans are numbers to pandas but never a price or a quantity; containers neither.
        usable = np.fromiter(
            (type(v) in (str, int, float) for v in raw), dtype=bool, count=len(raw)
        )
        raw = raw.where(usable)
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    retry = np.flatnonzero(present & numbers.isna().to_numpy())
    if len(retry):
        text = raw.iloc[retry].astype("string")
        text = text.str.replace(r"[\s\u00a0\u202f]", "", regex=True).str.replace(",", ".")
        numbers.iloc[retry] = pd.to_numeric(text, errors="coerce").astype("float64").to_numpy()
    return numbers, present & numbers.isna().to_numpy()


def build_integers(values: Column) -> tuple[pd.Series, np.ndarray]:
    """Parse integer ids/counts (ints or digit strings) into ``Int64``.

    A value that is present but not a whole number (``"abc"``, ``1.5``, ``true``) is NA and
    marked bad. Whole floats (``2.0``) are accepted, as spreadsheets write them.
    """
    short = _read_short(values, parse_integer)
    if short is not None:
        return pd.Series(pd.array(short, dtype="Int64")), np.zeros(len(short), dtype=bool)
    raw = as_object_series(values)
    if infer_dtype(raw, skipna=True) in ("integer", "empty"):
        try:
            return pd.Series(pd.array(raw.to_numpy(), dtype="Int64")), np.zeros(len(raw), bool)
        except (TypeError, ValueError, OverflowError):
            pass  # an int beyond int64: take the general path, which marks it bad
    present = build_present_mask(raw)
    numbers, _ = build_decimals(raw)
    exact = numbers.to_numpy(na_value=np.nan)
    whole = np.isfinite(exact) & (np.abs(np.nan_to_num(exact)) < 2**53)
    whole[whole] = np.mod(exact[whole], 1) == 0
    out = pd.Series(pd.NA, index=raw.index, dtype="Int64")
    out[whole] = exact[whole].astype("int64")
    # Ids beyond 2**53 lose digits through float: read those from their text exactly.
    big = present & ~whole
    if big.any():
        out[big] = pd.array([_exact_int(v) for v in raw[big]], dtype="Int64")
    return out, present & out.isna().to_numpy()


def _exact_int(value: Any) -> int | None:
    if type(value) is bool:
        return None
    text = str(value).strip()
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()) or not _INT64_MIN <= int(text) <= _INT64_MAX:
        return None
    return int(text)


_NO_TEXT = pa.scalar(None, pa.large_string())


def build_strings(values: Column) -> pd.Series:
    """Free text or codes as ``string``, trimmed; numbers are written out, ``""`` becomes NA."""
    short = _read_short(values, parse_text)
    if short is not None:
        return pd.Series(pd.array(short, dtype="string"))
    if isinstance(values, pd.Series):
        listed: Any = values.to_numpy(dtype=object)
    elif isinstance(values, np.ndarray):
        listed = values
    else:
        listed = list(values)
    try:
        text = pa.array(listed, type=pa.large_string(), from_pandas=True)
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        text = pa.array([_text_or_none(v) for v in listed], type=pa.large_string())
    text = pc.utf8_trim_whitespace(text)
    text = pc.if_else(pc.equal(text, ""), _NO_TEXT, text)
    return pd.Series(pd.array(text, dtype="string"))


def _text_or_none(value: Any) -> str | None:
    """Scalars as text; containers, NaN and NA are no text at all."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int) or (isinstance(value, float) and np.isfinite(value)):
        return str(value)
    return None


def build_booleans(values: Column) -> pd.Series:
    """JSON booleans as ``boolean``; anything else (null, strings) is NA."""
    raw = as_object_series(values)
    return pd.Series(pd.array([parse_bool(v) for v in raw], dtype="boolean"))
