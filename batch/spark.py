"""The nightly batch for many shops on Spark: one history directory per shop, one task per shop.

``cancel-risk score --engine spark --history ROOT --out DIR`` runs :func:`run_spark_batch`:

- the driver lists the shop directories of ``ROOT`` (hidden and ``_``-prefixed names are not
  shops), loads the model once to check it, and ships its files to every executor with
  ``SparkContext.addFile``; each executor's Python worker loads it once and keeps it;
- a DataFrame with one row per shop, one partition per shop (largest shops first), goes
  through ``mapInArrow``: each shop is loaded with the ingestion's ``load_history`` and scored
  by :func:`batch.scoring.iter_score_chunks`, the pandas code the single-machine job
  runs, so the scores are the same to the last bit. The chunks already are Arrow tables, so
  they go to Spark as Arrow record batches (no pandas round trip: PySpark's pandas converter
  does not handle pandas 3's Arrow-backed string columns);
- the result is written to a hidden staging directory beside ``DIR`` and renamed to ``DIR``
  when complete: ``DIR/shop=<shop>/part-*.parquet`` (the columns of the single-machine output),
  ``DIR/_rejects/shop=<shop>/`` (rejected records) and ``DIR/_summary.json`` (per-shop counts).
  Readers of ``DIR`` as a Parquet dataset skip the ``_`` entries.

A shop whose history cannot be read, or whose rejected share is above the threshold, gets no
scores partition; it is listed in the summary with the reason and the command exits non-zero
after writing the other shops. Any other failure fails the whole job and leaves no output.

The history directories must be readable at the same path by the driver and every executor (a
shared mount); ``DIR`` may be any path Hadoop can write (``file:``, ``hdfs://``, ...).
PySpark is imported only inside these functions (the ``spark`` extra).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pandas as pd
import pyarrow as pa

from batch.chunk import OUTPUT_COLUMNS, OUTPUT_SCHEMA, ScoreTally, ScoringOptions
from batch.job import (
    DEFAULT_MAX_REJECTED_SHARE,
    build_posting_counts,
    build_summary,
    check_rejected_share,
)
from batch.models import ScoringModel, load_scoring_model
from batch.output import recover_staged_directory
from batch.scoring import AsOfError, iter_score_chunks, resolve_as_of

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from core.tables import HistoryTables

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"
APP_NAME = "cancel-risk-score"
REJECTS_DIR = "_rejects"
SUMMARY_FILE = "_summary.json"
SHOP_COLUMN = "shop"
# The session settings the job relies on: UTC timestamps, Parquet timestamps in microseconds
# (not the legacy INT96).
SESSION_CONFIG = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.parquet.compression.codec": "zstd",
}

# What a shop task returns: score rows, reject rows and one summary row, told apart by `kind`.
_REJECT_FIELDS = [
    pa.field("file", pa.string()),
    pa.field("line", pa.int64()),
    pa.field("reason", pa.string()),
]
TASK_SCHEMA = pa.schema(
    [
        pa.field(SHOP_COLUMN, pa.string()),
        pa.field("kind", pa.string()),
        *[f.with_nullable(True) for f in OUTPUT_SCHEMA],
        *_REJECT_FIELDS,
        pa.field("summary", pa.string()),
    ]
)
TASK_SCHEMA_DDL = (
    "shop string, kind string, posting_number string, order_number string, "
    "probability double, risk_level string, reasons string, actions string, decision string, "
    "expected_saving double, as_of timestamp, model_name string, model_version string, "
    "file string, line bigint, reason string, summary string"
)

# Per Python worker process: the models shipped to this executor, loaded once each.
_EXECUTOR_MODELS: dict[str, ScoringModel] = {}


class SparkBatchError(Exception):
    """The Spark job cannot start or finish (no shops, no PySpark, output in the way)."""


@dataclass(frozen=True)
class ShopTask:
    """What every shop task needs; pickled once into the job's closure."""

    model_file: str  # the name given to SparkContext.addFile
    model_name: str
    model_version: str
    model_uri: str
    as_of: str | None
    options: ScoringOptions
    max_rejected_share: float


@dataclass
class SparkBatchResult:
    """Per-shop summaries of a Spark run and where they went."""

    out: str
    summaries: dict[str, dict[str, Any]]
    failed_shops: dict[str, str] = field(default_factory=dict)

    def format(self) -> str:
        scored = sum(s["postings"]["scored"] for s in self.summaries.values())
        ok = len(self.summaries) - len(self.failed_shops)
        lines = [f"shops: {ok} scored, {len(self.failed_shops)} failed; postings scored: {scored}"]
        for shop, summary in sorted(self.summaries.items()):
            postings = summary["postings"]
            lines.append(
                f"  {shop}: {summary['status']}, {postings['scored']} scored, "
                f"{postings['rejected']} of {postings['read']} rejected"
            )
        lines.append(f"output: {self.out}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        reasons = "; ".join(f"{shop}: {why}" for shop, why in sorted(self.failed_shops.items()))
        return f"{len(self.failed_shops)} shops were not scored ({reasons})"


# --- shop discovery --------------------------------------------------------------------------


def find_shop_directories(root: str | Path) -> dict[str, Path]:
    """The shops of ``root`` by name, largest history first (so long tasks start early)."""
    root = Path(root)
    if not root.is_dir():
        raise SparkBatchError(f"--history {root} is not a directory of shop histories")
    shops = {
        entry.name: entry.resolve()
        for entry in root.iterdir()
        if entry.is_dir() and not entry.name.startswith((".", "_"))
    }
    if not shops:
        raise SparkBatchError(f"--history {root} holds no shop directories")

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())

    return dict(sorted(shops.items(), key=lambda item: (-size(item[1]), item[0])))


# --- the executor side -----------------------------------------------------------------------


def _executor_model(task: ShopTask) -> ScoringModel:
    """The shipped model, loaded on the first shop this Python worker scores."""
    model = _EXECUTOR_MODELS.get(task.model_file)
    if model is None:
        from pyspark import SparkFiles

        from core.model import RiskModel

        risk_model = RiskModel.load(SparkFiles.get(task.model_file))
        model = ScoringModel(risk_model, task.model_name, task.model_version, task.model_uri)
        _EXECUTOR_MODELS.clear()  # a reused worker keeps only the current job's model
        _EXECUTOR_MODELS[task.model_file] = model
    return model


def _task_batch(shop: str, kind: str, columns: dict[str, Any], rows: int) -> pa.RecordBatch:
    """Rows of the task schema: ``columns`` (Arrow arrays or lists) filled, the others null."""
    arrays = []
    for column in TASK_SCHEMA:
        if column.name == SHOP_COLUMN:
            values = pa.array([shop] * rows, pa.string())
        elif column.name == "kind":
            values = pa.array([kind] * rows, pa.string())
        elif column.name not in columns:
            values = pa.nulls(rows, column.type)
        elif isinstance(columns[column.name], pa.ChunkedArray | pa.Array):
            values = columns[column.name].cast(column.type)
        else:
            values = pa.array(columns[column.name], column.type)
        arrays.append(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    return pa.RecordBatch.from_arrays(arrays, schema=TASK_SCHEMA)


def _summary_batch(shop: str, summary: dict[str, Any]) -> pa.RecordBatch:
    return _task_batch(shop, "summary", {"summary": [orjson.dumps(summary).decode()]}, 1)


def _reject_batch(shop: str, tables: HistoryTables) -> pa.RecordBatch:
    rejects = tables.rejects.sort_values(["file", "line", "reason"], kind="stable")
    columns = {
        "file": rejects["file"].to_numpy(dtype=object, na_value=None),
        "line": rejects["line"].to_numpy(dtype=object, na_value=None),
        "reason": rejects["reason"].to_numpy(dtype=object, na_value=None),
    }
    return _task_batch(shop, "reject", columns, len(rejects))


def score_shop(
    shop: str, history: str, model: ScoringModel, task: ShopTask
) -> Iterator[pa.RecordBatch]:
    """One shop's task output: score chunks, then its rejects, then its summary row."""
    from core.errors import HistoryError
    from core.ingest import load_history

    try:
        tables = load_history(history)
    except HistoryError as exc:
        from core.tables import HistoryTables

        summary = build_summary(
            status="failed",
            tables=HistoryTables.empty(),
            model=model,
            as_of=None,
            max_rejected_share=task.max_rejected_share,
            tally=None,
            lang=task.options.lang,
            error=str(exc),
        )
        yield _summary_batch(shop, summary)
        return
    _, error = check_rejected_share(build_posting_counts(tables), task.max_rejected_share)
    as_of = tally = None
    if error is None:
        try:
            as_of = resolve_as_of(tables, task.as_of)
        except AsOfError as exc:
            error = str(exc)
    if as_of is not None:
        tally = ScoreTally()
        for chunk in iter_score_chunks(tables, model, as_of, task.options, tally):
            columns = {name: chunk.column(name) for name in chunk.column_names}
            yield _task_batch(shop, "score", columns, chunk.num_rows)
    yield _reject_batch(shop, tables)
    summary = build_summary(
        status="ok" if tally is not None else "failed",
        tables=tables,
        model=model,
        as_of=as_of,
        max_rejected_share=task.max_rejected_share,
        tally=tally,
        lang=task.options.lang,
        error=error,
    )
    yield _summary_batch(shop, summary)


def score_shop_partition(
    batches: Iterator[pa.RecordBatch], *, task: ShopTask
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: every (shop, history) row of the partition, scored in turn."""
    model = _executor_model(task)
    for batch in batches:
        rows = batch.to_pydict()
        for shop, history in zip(rows[SHOP_COLUMN], rows["history"], strict=True):
            logger.info("scoring shop %s from %s", shop, history)
            yield from score_shop(str(shop), str(history), model, task)


# --- the driver side -------------------------------------------------------------------------


def build_spark_session(
    master: str = DEFAULT_MASTER, config: Mapping[str, str] | None = None
) -> SparkSession:
    """A session with the settings the job relies on (:data:`SESSION_CONFIG`) and ``config``."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkBatchError(
            "--engine spark needs PySpark: install the spark extra (pip install '.[spark]')"
        ) from None
    builder = SparkSession.builder.master(master).appName(APP_NAME)
    for key, value in {**SESSION_CONFIG, **(config or {})}.items():
        builder = builder.config(key, value)
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local workers run this interpreter (its virtualenv), not whatever python3 is on PATH;
        # PySpark reads the variable when the context starts.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    with _quiet_pandas_warning():
        return builder.getOrCreate()


@contextmanager
def _quiet_pandas_warning() -> Iterator[None]:
    """PySpark 4.3 warns that it does not fully support pandas 3: the job gives it Arrow only."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
        )
        yield


def _active_session() -> SparkSession | None:
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        return None
    return SparkSession.getActiveSession()


class _HadoopPaths:
    """Rename, delete and write small files through Hadoop's FileSystem (any URI Spark writes)."""

    def __init__(self, spark: SparkSession):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, uri: str) -> tuple[Any, Any]:
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        return path.getFileSystem(self._conf), path

    def exists(self, uri: str) -> bool:
        fs, path = self._path(uri)
        return bool(fs.exists(path))

    def delete(self, uri: str) -> None:
        fs, path = self._path(uri)
        fs.delete(path, True)

    def rename(self, source: str, target: str) -> None:
        fs, src = self._path(source)
        if not fs.rename(src, self._path(target)[1]):
            raise SparkBatchError(f"cannot rename {source} to {target}")

    def write_bytes(self, uri: str, data: bytes) -> None:
        fs, path = self._path(uri)
        stream = fs.create(path, True)
        try:
            stream.write(bytearray(data))
            stream.hsync()
        finally:
            stream.close()


def _sibling(out: str, label: str) -> str:
    """A hidden name beside ``out`` for this process (staging, or the replaced output)."""
    parent, _, name = out.rstrip("/").rpartition("/")
    return f"{parent}/.{name}.{os.getpid()}.{secrets.token_hex(4)}.{label}"


def _local_path(out: str | Path) -> Path | None:
    """``out`` as a local path when it names one (no scheme, or ``file:``), else None."""
    text = str(out)
    if text.startswith("file:"):
        return Path(text.removeprefix("file:").removeprefix("//")).resolve()
    return None if "://" in text else Path(text).resolve()


def _as_uri(out: str | Path) -> str:
    """A URI Hadoop resolves the same on every node; Hadoop quotes the path itself."""
    local = _local_path(out)
    return str(out) if local is None else f"file:{local}"


def write_spark_outputs(
    spark: SparkSession, result: DataFrame, out: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Write scores, rejects and summary to a staging directory, then move it to ``out``."""
    fs = _HadoopPaths(spark)
    staging = _sibling(out, "tmp")
    replaced = _sibling(out, "old")
    try:
        scores = result.where(result.kind == "score").select(SHOP_COLUMN, *OUTPUT_COLUMNS)
        scores.sortWithinPartitions(SHOP_COLUMN, "posting_number").write.partitionBy(
            SHOP_COLUMN
        ).parquet(staging)
        rejects = result.where(result.kind == "reject").select(
            SHOP_COLUMN, "file", "line", "reason"
        )
        rejects.sortWithinPartitions(SHOP_COLUMN, "file", "line").write.partitionBy(
            SHOP_COLUMN
        ).parquet(f"{staging}/{REJECTS_DIR}")
        rows = result.where(result.kind == "summary").select(SHOP_COLUMN, "summary").collect()
        summaries = {row[SHOP_COLUMN]: orjson.loads(row["summary"]) for row in rows}
        summaries = dict(sorted(summaries.items()))
        failed = {
            shop: str(summary.get("error"))
            for shop, summary in summaries.items()
            if summary["status"] != "ok"
        }
        fs.write_bytes(
            f"{staging}/{SUMMARY_FILE}",
            orjson.dumps({"shops": summaries, "failed": failed}, option=orjson.OPT_INDENT_2),
        )
        had_output = fs.exists(out)
        if had_output:
            fs.rename(out, replaced)
        fs.rename(staging, out)
        if had_output:
            fs.delete(replaced)
    except BaseException:
        fs.delete(staging)
        raise
    return summaries, failed


def run_spark_batch(
    root: str | Path,
    out: str | Path,
    *,
    model: ScoringModel | str,
    as_of: pd.Timestamp | str | None = None,
    options: ScoringOptions | None = None,
    max_rejected_share: float = DEFAULT_MAX_REJECTED_SHARE,
    master: str = DEFAULT_MASTER,
    spark: SparkSession | None = None,
) -> SparkBatchResult:
    """Score every shop directory of ``root`` on Spark into the dataset ``out`` (see module doc).

    Uses ``spark``, or the process's active session, when there is one (and leaves it running);
    otherwise starts a session on ``master`` and stops it at the end.
    """
    options = options or ScoringOptions()
    shops = find_shop_directories(root)
    scoring_model = load_scoring_model(model) if isinstance(model, str) else model
    if spark is None:
        spark = _active_session()
    own_session = spark is None
    spark = spark or build_spark_session(master)
    out_uri = _as_uri(out)
    local_out = _local_path(out)
    if local_out is not None:
        recover_staged_directory(local_out)
    shipped = Path(tempfile.mkdtemp(prefix="cancel-risk-model-"))
    try:
        model_dir = scoring_model.risk_model.save(shipped / f"model-{secrets.token_hex(6)}")
        spark.sparkContext.addFile(str(model_dir), recursive=True)
        task = ShopTask(
            model_file=model_dir.name,
            model_name=scoring_model.name,
            model_version=scoring_model.version,
            model_uri=scoring_model.uri,
            as_of=None if as_of is None else pd.Timestamp(as_of).isoformat(),
            options=options,
            max_rejected_share=max_rejected_share,
        )
        rows = [(shop, str(path)) for shop, path in shops.items()]
        shop_rows = spark.sparkContext.parallelize(rows, numSlices=len(rows))
        frame = spark.createDataFrame(shop_rows, f"{SHOP_COLUMN} string, history string")
        with _quiet_pandas_warning():
            result = frame.mapInArrow(partial(score_shop_partition, task=task), TASK_SCHEMA_DDL)
        result = result.persist()
        try:
            summaries, failed = write_spark_outputs(spark, result, out_uri)
        finally:
            result.unpersist()
    finally:
        shutil.rmtree(shipped, ignore_errors=True)
        if own_session:
            spark.stop()
    logger.info("scored %d shops into %s (%d failed)", len(summaries), out_uri, len(failed))
    return SparkBatchResult(out=str(out), summaries=summaries, failed_shops=failed)
