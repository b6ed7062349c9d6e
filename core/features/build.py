"""The entry points: the feature definition on history columns (:func:`build_feature_columns`)
and on ingestion's tables (:func:`build_features`, :func:`build_feature_rows`), and which
postings are open at a moment."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from core.aggregates import HistoryAggregates, build_open_mask, build_resolutions
from core.columns import (
    Array,
    HistoryColumns,
)
from core.features.context import FeatureContext
from core.features.families import FAMILY_BUILDERS
from core.features.schema import CATEGORICAL_COLUMNS, FEATURE_COLUMNS, ColumnValues
from core.point_in_time import NAT_NS, from_ns, to_ns, to_utc
from core.tables import HistoryTables

logger = logging.getLogger(__name__)


# --- public entry points ----------------------------------------------------------------------


def _normalised_moments(moments: pd.DataFrame) -> pd.DataFrame:
    """Moments with a string ``posting_number`` and a UTC ``as_of``; refuses unusable ones."""
    missing = {"posting_number", "as_of"} - set(moments.columns)
    if missing:
        raise ValueError(f"moments need the columns {sorted(missing)}")
    as_of = pd.to_datetime(moments["as_of"], utc=True).astype("datetime64[ns, UTC]")
    if as_of.isna().any():
        raise ValueError("every moment needs an as_of timestamp")
    return pd.DataFrame(
        {
            "posting_number": moments["posting_number"].astype("string").array,
            "as_of": as_of.array,
        }
    )


def _check_unique_postings(tables: HistoryTables) -> None:
    duplicated = tables.postings["posting_number"].duplicated()
    if duplicated.any():
        examples = tables.postings.loc[duplicated, "posting_number"].head(3).tolist()
        raise ValueError(f"posting numbers must be unique in the postings table: {examples}")


def build_feature_columns(
    history: HistoryColumns,
    posting_numbers: Array,
    as_of_ns: np.ndarray,
    aggregates: HistoryAggregates,
) -> dict[str, ColumnValues]:
    """The feature definition: every feature of each moment (posting, ``as_of`` in UTC ns).

    One column per name of :data:`FEATURE_COLUMNS`, in the moments' order: categorical columns
    as text keys (see :mod:`core.columns`), all others float (NaN = unknown). A moment whose
    posting ``history`` does not hold gets all features missing. This is what training's
    snapshots, the nightly batch and a REST request all run, on a million moments or on one.
    """
    as_of_ns = np.asarray(as_of_ns, dtype="int64")
    # Moments in time order: every point-in-time join then meets its queries already sorted.
    order = np.argsort(as_of_ns, kind="stable")
    ctx = FeatureContext(history, posting_numbers[order], as_of_ns[order], aggregates)
    columns: dict[str, ColumnValues] = {}
    for builder in FAMILY_BUILDERS.values():
        columns.update(builder(ctx))
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    columns = {name: values[restore] for name, values in columns.items()}
    unknown = ctx.posting_row[restore] < 0
    if unknown.any():
        logger.warning("%d moments refer to postings the history does not hold", int(unknown.sum()))
        columns = {name: _blank(values, unknown) for name, values in columns.items()}
    return columns


def build_feature_rows(
    tables: HistoryTables,
    moments: pd.DataFrame,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """Features for each moment (``posting_number``, ``as_of``), one row each, in the same order.

    :func:`build_feature_columns` on the normalised tables, as a frame indexed like ``moments``
    with exactly :data:`FEATURE_COLUMNS` (categorical columns as ``string``). ``aggregates`` are
    the history aggregates learned in training; without them they are fitted on ``tables`` at
    the latest moment (point in time either way).
    """
    _check_unique_postings(tables)
    normalised = _normalised_moments(moments)
    if len(normalised) == 0:
        return _assemble({column: np.empty(0) for column in FEATURE_COLUMNS}, moments.index)
    if aggregates is None:
        aggregates = HistoryAggregates.fit(tables, normalised["as_of"].max())
    columns = build_feature_columns(
        HistoryColumns.from_tables(tables),
        normalised["posting_number"].array,
        to_ns(normalised["as_of"]),
        aggregates,
    )
    return _assemble(columns, moments.index)


def _blank(values: ColumnValues, where: np.ndarray) -> ColumnValues:
    """``values`` missing (NA, None or NaN) where ``where``."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return np.where(where, np.nan, values)
    values = values.copy()
    values[where] = None
    return values


def _assemble(columns: dict[str, ColumnValues], index: pd.Index) -> pd.DataFrame:
    """The feature frame: :data:`FEATURE_COLUMNS` in order, strings or floats."""
    data = {
        column: pd.array(columns[column], dtype="string")
        if column in CATEGORICAL_COLUMNS
        else np.asarray(columns[column], dtype="float64")
        for column in FEATURE_COLUMNS
    }
    return pd.DataFrame(data, index=index)


def open_postings_at(tables: HistoryTables, as_of: pd.Timestamp | str) -> pd.Index:
    """The posting numbers open at ``as_of`` (ordered, not delivered or cancelled by then), sorted.

    A posting with a terminal status but no known closing time cannot be placed in time and is
    never open; how many there are is logged.
    """
    as_of_ns = to_utc(as_of).value
    postings = tables.postings
    resolutions = build_resolutions(postings)
    ordered_ns = to_ns(postings["ordered_at"])
    unplaceable = resolutions["closing_time_unknown"].to_numpy()
    is_open = build_open_mask(
        ordered_ns, to_ns(resolutions["closed_at"]), unplaceable, np.full(len(postings), as_of_ns)
    )
    n_unplaceable = int((unplaceable & (ordered_ns != NAT_NS) & (ordered_ns <= as_of_ns)).sum())
    if n_unplaceable:
        logger.info(
            "%d postings have a terminal status but no closing time and are never open",
            n_unplaceable,
        )
    numbers = postings.loc[is_open, "posting_number"].astype("string")
    return pd.Index(numbers.sort_values().to_numpy(), dtype="string", name="posting_number")


def build_features(
    tables: HistoryTables,
    as_of: pd.Timestamp | str,
    aggregates: HistoryAggregates | None = None,
) -> pd.DataFrame:
    """Features of every posting open at ``as_of``, indexed by ``posting_number``.

    The feature function of the project; the same as :func:`build_feature_rows` on the moments
    (open posting, ``as_of``).
    """
    as_of = to_utc(as_of)
    open_postings = open_postings_at(tables, as_of)
    moments = pd.DataFrame(
        {
            "posting_number": open_postings.to_numpy(),
            "as_of": from_ns(np.full(len(open_postings), as_of.value, dtype="int64")),
        }
    )
    rows = build_feature_rows(tables, moments, aggregates)
    rows.index = open_postings
    return rows
