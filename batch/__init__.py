"""Nightly batch scoring: every posting a shop has open, scored, explained and written safely.

- :func:`run_batch` (``cancel-risk score``): one shop's history directory to one Parquet or CSV
  file, with the rejects and the run summary beside it.
- :func:`batch.spark.run_spark_batch` (``cancel-risk score --engine spark``): a
  directory of shops on a Spark cluster, each shop scored by the same pandas code
  (:mod:`batch.scoring`), the result partitioned by shop. PySpark is imported only
  there (the ``spark`` extra).
"""

from batch.chunk import OUTPUT_COLUMNS, OUTPUT_SCHEMA, ScoringOptions
from batch.job import (
    DEFAULT_MAX_REJECTED_SHARE,
    BatchResult,
    RejectedShareError,
    run_batch,
)
from batch.models import (
    DEFAULT_MODEL_URI,
    ModelSourceError,
    ScoringModel,
    load_scoring_model,
)
from batch.output import OutputError, build_output_paths
from batch.scoring import AsOfError

__all__ = [
    "DEFAULT_MAX_REJECTED_SHARE",
    "DEFAULT_MODEL_URI",
    "OUTPUT_COLUMNS",
    "OUTPUT_SCHEMA",
    "AsOfError",
    "BatchResult",
    "ModelSourceError",
    "OutputError",
    "RejectedShareError",
    "ScoringModel",
    "ScoringOptions",
    "build_output_paths",
    "load_scoring_model",
    "run_batch",
]
