"""Point-in-time features: the one feature definition of the project.

:func:`build_feature_columns` computes every feature of each moment (posting, ``as_of``) from a
seller's history held as plain columns (:mod:`core.columns`). Training's snapshots and the
nightly batch reach it through :func:`build_features` / :func:`build_feature_rows`, which read
ingestion's tables as columns; the REST service through its request lane, which writes a
request's records into the same columns. There is no other implementation of a feature.

A feature for a posting at a moment ``as_of`` reads only what was known then: events with
``at <= as_of``, closing and handover times only through an explicit ``<= as_of`` check, and
never the posting's export-time status or cancellation fields. Every "latest value at as_of" is
a point-in-time lookup (:func:`core.point_in_time.latest_row`); multi-line postings become one
number by value-weighted means. Nothing loops over postings or moments in Python.

A family whose input file is absent yields NaN. "Absent" is judged at ``as_of`` too: until the
first scan (or push) anywhere in the history, scan (or push) counts are unknown rather than zero,
so a seller who started archiving late does not teach the model that old orders had no scans.

- :mod:`core.features.schema`: the feature names by family, the version, shared constants;
- :mod:`core.features.context`: what the families share for one batch of moments;
- :mod:`core.features.families`: the families;
- :mod:`core.features.build`: the entry points.
"""

from core.features.build import (
    build_feature_columns,
    build_feature_rows,
    build_features,
    open_postings_at,
)
from core.features.families import build_promise_at
from core.features.schema import (
    CATEGORICAL_COLUMNS,
    DELIVERY_STAGES,
    FEATURE_COLUMNS,
    FEATURE_FAMILIES,
    FEATURE_VERSION,
    HANDED_OVER_STAGE,
    RUB_PER_UNIT,
    STATIC_COLUMNS,
    TOLERATED_SILENCE_HOURS,
)

__all__ = [
    "CATEGORICAL_COLUMNS",
    "DELIVERY_STAGES",
    "FEATURE_COLUMNS",
    "FEATURE_FAMILIES",
    "FEATURE_VERSION",
    "HANDED_OVER_STAGE",
    "RUB_PER_UNIT",
    "STATIC_COLUMNS",
    "TOLERATED_SILENCE_HOURS",
    "build_feature_columns",
    "build_feature_rows",
    "build_features",
    "build_promise_at",
    "open_postings_at",
]
