"""The nightly batch on one machine: a shop's history directory in, scores file out.

:func:`run_batch` loads the history, checks the share of rejected postings, scores every
posting open at ``as_of`` chunk by chunk (:mod:`batch.scoring`) and streams the chunks
into a temporary file that becomes the output only when it is complete
(:mod:`batch.output`). The rejects and the run summary are written beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from batch.chunk import OUTPUT_SCHEMA, ScoreTally, ScoringOptions
from batch.models import ScoringModel, load_scoring_model
from batch.output import (
    OutputPaths,
    ScoreWriter,
    StagedFiles,
    build_output_paths,
    file_sha256,
    remove_stale_temporaries,
    write_json,
    write_rejects,
)
from batch.progress import Progress
from batch.scoring import iter_score_chunks, resolve_as_of
from core.tables import HistoryTables

logger = logging.getLogger(__name__)

DEFAULT_MAX_REJECTED_SHARE = 0.05
SUMMARY_VERSION = 1


class RejectedShareError(Exception):
    """Too large a share of the postings was rejected: the export is not trusted for scoring."""

    def __init__(self, message: str, summary: dict[str, Any], paths: OutputPaths):
        super().__init__(message)
        self.summary = summary
        self.paths = paths


@dataclass
class BatchResult:
    """What a run wrote and counted; ``seconds`` is the time per step (not in any file)."""

    paths: OutputPaths
    summary: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def build_posting_counts(tables: HistoryTables) -> dict[str, int]:
    """Posting records read, rejected, merged as duplicates and kept, from the load report."""
    report = tables.report
    return {
        "read": int(report.postings_read),
        "rejected": int(report.postings_rejected),
        "duplicates_merged": int(report.duplicates_merged),
        "kept": int(report.postings_kept),
    }


def build_rejected_share(counts: Mapping[str, int]) -> float:
    return counts["rejected"] / counts["read"] if counts["read"] else 0.0


def check_rejected_share(
    counts: Mapping[str, int], max_rejected_share: float
) -> tuple[float, str | None]:
    """The rejected share of the posting records, and why it fails the threshold (or None)."""
    share = build_rejected_share(counts)
    if share > max_rejected_share:
        return share, (
            f"{counts['rejected']} of {counts['read']} posting records were rejected "
            f"({share:.1%}, more than the allowed {max_rejected_share:.1%}); "
            "see the rejects file for which lines and why"
        )
    return share, None


def build_summary(
    *,
    status: str,
    tables: HistoryTables,
    model: ScoringModel,
    as_of: pd.Timestamp | None,
    max_rejected_share: float,
    tally: ScoreTally | None,
    lang: str,
    error: str | None = None,
) -> dict[str, Any]:
    """The run summary: counts (read, scored, rejected, skipped as not open) and settings.

    It holds nothing that changes from one run to the next on the same inputs.
    """
    counts = build_posting_counts(tables)
    scored = tally.scored if tally is not None else 0
    postings = {
        **counts,
        "skipped_not_open": counts["kept"] - scored if tally is not None else None,
        "scored": scored,
    }
    rejected_records = len(tables.rejects)
    return {
        "summary_version": SUMMARY_VERSION,
        "status": status,
        "error": error,
        "as_of": None if as_of is None else _iso(as_of),
        "model": {"name": model.name, "version": model.version, "uri": model.uri},
        "lang": lang,
        "postings": postings,
        "other_records_rejected": rejected_records - counts["rejected"],
        "rejected_share": round(build_rejected_share(counts), 6),
        "max_rejected_share": max_rejected_share,
        "risk_levels": _levels(tally),
        "decisions": dict(sorted(tally.decisions.items())) if tally is not None else {},
        "files_read": dict(sorted(tables.report.files_read.items())),
        "missing_optional_files": sorted(tables.report.missing_optional),
        "warnings": list(tables.report.warnings),
    }


def format_summary(summary: Mapping[str, Any], paths: OutputPaths | None = None) -> str:
    """The summary as a few lines for the terminal, with the files written when given."""
    postings = summary["postings"]
    model = summary["model"]
    lines = [
        f"status: {summary['status']}",
        f"model: {model['name']} version {model['version']}",
        f"postings: {postings['read']} read, {postings['rejected']} rejected "
        f"({summary['rejected_share']:.2%}, allowed {summary['max_rejected_share']:.2%}), "
        f"{postings['duplicates_merged']} duplicates merged, {postings['kept']} kept",
        f"other records rejected: {summary['other_records_rejected']}",
    ]
    if summary["status"] == "ok":
        levels = ", ".join(f"{k} {v}" for k, v in summary["risk_levels"].items())
        decisions = ", ".join(f"{k} {v}" for k, v in summary["decisions"].items())
        lines += [
            f"as of: {summary['as_of']}",
            f"scored: {postings['scored']} open, {postings['skipped_not_open']} skipped "
            "(not open at as_of)",
            f"risk levels: {levels}",
            f"decisions: {decisions or '-'}",
        ]
    if paths is not None:
        if summary["status"] == "ok":
            lines.append(f"scores: {paths.scores}")
        lines += [f"rejects: {paths.rejects}", f"summary: {paths.summary}"]
    return "\n".join(lines)


def _levels(tally: ScoreTally | None) -> dict[str, int]:
    from core.model import RISK_LEVELS

    if tally is None:
        return {}
    return {level: int(tally.risk_levels.get(level, 0)) for level in RISK_LEVELS}


def _iso(moment: pd.Timestamp) -> str:
    return moment.tz_convert("UTC").isoformat().replace("+00:00", "Z")


def run_batch(
    history: str | Path,
    out: str | Path,
    *,
    model: ScoringModel | str,
    as_of: pd.Timestamp | str | None = None,
    options: ScoringOptions | None = None,
    max_rejected_share: float = DEFAULT_MAX_REJECTED_SHARE,
    progress: Progress | None = None,
) -> BatchResult:
    """Score every posting of ``history`` open at ``as_of`` into ``out`` (.parquet or .csv).

    Writes ``out`` and, beside it, ``<stem>.rejects.csv`` and ``<stem>.summary.json``, all
    atomically. When the rejected share of posting records exceeds ``max_rejected_share`` the
    rejects and the summary (status ``failed``) are written, the scores are not (an existing
    scores file is left as it was), and :class:`RejectedShareError` is raised.
    """
    from core.ingest import load_history

    options = options or ScoringOptions()
    progress = progress or Progress()
    paths = build_output_paths(out)
    remove_stale_temporaries([paths.scores, paths.rejects, paths.summary])
    seconds: dict[str, float] = {}
    try:
        started = time.perf_counter()
        if isinstance(model, str):
            with progress.stage("load model"):
                model = load_scoring_model(model)
        seconds["load_model"] = time.perf_counter() - started

        started = time.perf_counter()
        with progress.stage("load history"):
            tables = load_history(Path(history))
        seconds["load_history"] = time.perf_counter() - started

        settings = {"model": model, "max_rejected_share": max_rejected_share, "lang": options.lang}
        _, too_many = check_rejected_share(build_posting_counts(tables), max_rejected_share)
        if too_many is not None:
            summary = build_summary(
                status="failed", tables=tables, as_of=None, tally=None, error=too_many, **settings
            )
            with StagedFiles() as staged:
                write_rejects(staged.stage(paths.rejects), tables.rejects)
                write_json(staged.stage(paths.summary), summary)
                staged.commit()
            raise RejectedShareError(too_many, summary, paths)

        moment = resolve_as_of(tables, as_of)
        tally = ScoreTally()
        with StagedFiles() as staged:
            rejects_tmp = staged.stage(paths.rejects)
            summary_tmp = staged.stage(paths.summary)
            scores_tmp = staged.stage(paths.scores)
            write_score_chunks(
                scores_tmp,
                paths.format,
                iter_score_chunks(tables, model, moment, options, tally, progress),
                tally,
            )
            with progress.stage("write"):
                started = time.perf_counter()
                write_rejects(rejects_tmp, tables.rejects)
                summary = build_summary(
                    status="ok", tables=tables, as_of=moment, tally=tally, **settings
                )
                summary["outputs"] = {
                    "scores": paths.scores.name,
                    "scores_sha256": file_sha256(scores_tmp),
                    "rejects": paths.rejects.name,
                }
                write_json(summary_tmp, summary)
                staged.commit()
                tally.add_time("write", started)
        seconds.update(tally.seconds)
    finally:
        progress.close()
    logger.info(
        "scored %d postings at %s into %s", summary["postings"]["scored"], summary["as_of"], out
    )
    return BatchResult(paths=paths, summary=summary, seconds=seconds)


def write_score_chunks(
    path: Path, file_format: str, chunks: Iterable[pa.Table], tally: ScoreTally
) -> None:
    """Stream score chunks into ``path``; the time spent writing goes to ``tally``."""
    writer = ScoreWriter(path, OUTPUT_SCHEMA, file_format)
    try:
        for chunk in chunks:
            started = time.perf_counter()
            writer.write(chunk)
            tally.add_time("write", started)
        started = time.perf_counter()
        writer.close()
        tally.add_time("write", started)
    except BaseException:
        writer.abort()
        raise
