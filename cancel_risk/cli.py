"""The `cancel-risk` command line. Commands parse options and delegate; no logic lives here."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from core import __version__

if TYPE_CHECKING:
    import pandas as pd

app = typer.Typer(
    help="Ozon cancellation-risk: simulate, inspect, train and score a seller's order history.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

HistoryOption = Annotated[
    Path,
    typer.Option("--history", help="History directory (see data/CONTRACT.md).", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        int, typer.Option("-v", "--verbose", count=True, help="-v info, -vv debug.")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str) -> typer.Exit:
    """Print one clear message to stderr and return the exit (code 2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the history into.")],
    days: Annotated[int, typer.Option(min=1, help="Simulated days of trading.")] = 120,
    orders_per_day: Annotated[int, typer.Option(min=1, help="Mean orders per day.")] = 150,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same files.")] = 0,
    format: Annotated[
        str, typer.Option("--format", help="Postings as API JSON Lines (jsonl) or cabinet csv.")
    ] = "jsonl",
    truth: Annotated[
        bool,
        typer.Option(
            "--truth",
            help="Also write truth.csv (true cancel probabilities) and truth_causes.csv "
            "(each cause's part of them).",
        ),
    ] = False,
) -> None:
    """Simulate a seller's shop and write its history in the contract's format."""
    from simulator import SimulationConfig, simulate_shop, write_history

    if format not in ("jsonl", "csv"):
        raise fail(f"--format must be jsonl or csv, not {format!r}")
    world = simulate_shop(
        SimulationConfig(days=days, orders_per_day=orders_per_day, seed=seed), truth=truth
    )
    written = write_history(world, out, posting_format=format, truth=truth)
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def inspect(
    history: HistoryOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    csv_cancellations_are_buyer: Annotated[
        bool,
        typer.Option(
            "--csv-cancellations-are-buyer",
            help="Count cancelled orders.csv rows (no initiator there) as buyer cancellations.",
        ),
    ] = False,
) -> None:
    """Load a history directory and print what was read, kept and rejected."""
    from core.errors import HistoryError
    from core.ingest import load_history
    from training.inspect import format_summary, summarize

    try:
        tables = load_history(history, csv_cancellations_are_buyer=csv_cancellations_are_buyer)
    except HistoryError as exc:
        raise fail(str(exc)) from None
    summary = summarize(tables)
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False, indent=2, default=str))
    else:
        typer.echo(format_summary(summary))


@app.command()
def train(
    history: HistoryOption,
    as_of: Annotated[
        str | None,
        typer.Option(
            "--as-of", help="Train on what was known at this ISO-8601 moment (default: latest)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Training config YAML (over the defaults).")
    ] = None,
    promote_if_better: Annotated[
        bool,
        typer.Option(
            "--promote-if-better",
            help="Make the new version the champion if it beats the current one (or none).",
        ),
    ] = False,
) -> None:
    """Train, evaluate and register a model; print its metrics beside the baselines and truth."""
    from mlflow.exceptions import MlflowException

    from core.errors import HistoryError
    from core.model import IncompatibleModelError
    from training.config import ConfigError, load_training_config
    from training.fit import TrainingDataError
    from training.registry import PromotionError
    from training.train import format_comparison, train_from_history

    try:
        moment = _parse_moment(as_of) if as_of is not None else None
        settings = load_training_config(config)
        result = train_from_history(
            history, as_of=moment, config=settings, promote_if_better=promote_if_better
        )
    except (
        ConfigError,
        HistoryError,
        TrainingDataError,
        IncompatibleModelError,
        PromotionError,
        MlflowException,
    ) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"run id: {result.run_id}")
    typer.echo(f"registered: {settings.mlflow.registered_model_name} v{result.model_version}")
    typer.echo(f"as of: {result.as_of.isoformat()}")
    typer.echo(format_comparison(result.comparison))
    if result.reason_quality is not None:
        typer.echo(result.reason_quality.summary_line())
    if result.promotion is not None:
        verdict = "promoted to champion" if result.promotion.promoted else "not promoted"
        typer.echo(f"{verdict}: {result.promotion.reason}")


@app.command()
def promote(
    version: Annotated[
        str | None,
        typer.Option("--version", help="Model version to promote (default: the challenger)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="Training config YAML (promotion rule).")
    ] = None,
) -> None:
    """Make a version the champion if it beats the current champion on its own holdout."""
    from mlflow.exceptions import MlflowException

    from training.config import ConfigError, load_training_config
    from training.registry import PromotionError
    from training.train import promote_if_better_than_champion

    try:
        settings = load_training_config(config)
        result = promote_if_better_than_champion(settings, version)
    except (ConfigError, PromotionError, MlflowException) as exc:
        raise fail(str(exc)) from None
    verdict = "promoted to champion" if result.promoted else "not promoted"
    typer.echo(f"version {result.challenger_version} {verdict}: {result.reason}")


@app.command()
def score(
    history: Annotated[
        Path,
        typer.Option(
            "--history",
            help="History directory; with --engine spark, a directory of shop directories.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Scores file (.parquet or .csv); with --engine spark, a directory.",
            show_default=False,
        ),
    ],
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Score at this ISO-8601 moment (default: the latest event)."),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model", help="MLflow model URI, logged-model directory or saved RiskModel directory."
        ),
    ] = "models:/cancel-risk@champion",
    lang: Annotated[
        str, typer.Option("--lang", help="Language of reasons and actions: en, zh or ru.")
    ] = "en",
    max_rejected_share: Annotated[
        float,
        typer.Option(
            "--max-rejected-share",
            min=0.0,
            max=1.0,
            help="Fail (no scores) when a larger share of posting records is rejected.",
        ),
    ] = 0.05,
    playbook: Annotated[
        Path | None, typer.Option("--playbook", help="Seller's playbook YAML (reasons, actions).")
    ] = None,
    chunk_rows: Annotated[
        int, typer.Option("--chunk-rows", min=1, help="Postings scored per vectorised chunk.")
    ] = 100_000,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Processes scoring chunks side by side when there is more than one chunk "
            "(--engine local); default: the machine's cores, at most 4.",
        ),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (one shop) or spark (a directory of shops).")
    ] = "local",
    master: Annotated[
        str, typer.Option("--master", help="Spark master URL (--engine spark).")
    ] = "local[*]",
) -> None:
    """Score every open posting with its reasons, actions and decision; write it atomically."""
    from batch import (
        AsOfError,
        ModelSourceError,
        OutputError,
        RejectedShareError,
        ScoringOptions,
        run_batch,
    )
    from batch.job import format_summary
    from batch.progress import build_progress
    from batch.spark import SparkBatchError, run_spark_batch
    from core.errors import HistoryError
    from core.playbook import LANGUAGES, load_playbook

    if lang not in LANGUAGES:
        raise fail(f"--lang must be one of {', '.join(LANGUAGES)}, not {lang!r}")
    if engine not in ("local", "spark"):
        raise fail(f"--engine must be local or spark, not {engine!r}")
    moment = _parse_moment(as_of) if as_of is not None else None
    try:
        options = ScoringOptions(
            lang=lang,
            chunk_rows=chunk_rows,
            playbook=load_playbook(playbook) if playbook is not None else None,
            workers=(workers or min(4, os.cpu_count() or 1)) if engine == "local" else 1,
        )
    except (OSError, ValueError) as exc:
        raise fail(f"--playbook {playbook}: {exc}") from None
    try:
        if engine == "spark":
            spark_result = run_spark_batch(
                history,
                out,
                model=model,
                as_of=moment,
                options=options,
                max_rejected_share=max_rejected_share,
                master=master,
            )
            typer.echo(spark_result.format())
            if spark_result.failed_shops:
                raise fail(spark_result.failure_message())
            return
        result = run_batch(
            history,
            out,
            model=model,
            as_of=moment,
            options=options,
            max_rejected_share=max_rejected_share,
            progress=build_progress(),
        )
    except RejectedShareError as exc:
        typer.echo(format_summary(exc.summary, exc.paths), err=True)
        raise fail(str(exc)) from None
    except (
        HistoryError,
        ModelSourceError,
        AsOfError,
        OutputError,
        SparkBatchError,
        OSError,
    ) as exc:
        raise fail(str(exc)) from None
    typer.echo(format_summary(result.summary, result.paths))


def _parse_moment(text: str) -> pd.Timestamp:
    """An ISO-8601 moment as a UTC timestamp (naive means UTC); a clear error otherwise."""
    import pandas as pd

    try:
        moment = pd.Timestamp(text)
    except ValueError:
        raise fail(f"--as-of must be an ISO-8601 moment, not {text!r}") from None
    if pd.isna(moment):
        raise fail(f"--as-of must be an ISO-8601 moment, not {text!r}")
    return moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")


@app.command()
def report(
    history: HistoryOption,
    out: Annotated[Path, typer.Option("--out", help="HTML file to write.")],
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="ISO-8601 moment; default: the latest event.")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="Model URI or directory.")
    ] = "models:/cancel-risk@champion",
    lang: Annotated[
        str, typer.Option("--lang", help="Reasons and actions in en, zh or ru.")
    ] = "en",
    playbook: Annotated[
        Path | None, typer.Option("--playbook", help="Your own playbook YAML.")
    ] = None,
) -> None:
    """Write the cause-analysis report: where cancellations come from, what to do today."""
    from batch.models import ModelSourceError, load_scoring_model
    from core.errors import HistoryError
    from core.ingest import load_history
    from core.playbook import LANGUAGES, load_playbook
    from training.report import build_cause_analysis, write_report

    if lang not in LANGUAGES:
        raise fail(f"--lang must be one of {', '.join(LANGUAGES)}, not {lang!r}")
    try:
        tables = load_history(history)
        scoring_model = load_scoring_model(model)
        chosen_playbook = load_playbook(playbook) if playbook else None
    except (HistoryError, ModelSourceError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None
    moment = _parse_moment(as_of) if as_of else tables.latest_event_at()
    if moment is None:
        raise fail(f"{history} has no timestamps to take --as-of from; give --as-of")
    analysis = build_cause_analysis(
        tables, moment, scoring_model.risk_model, lang=lang, playbook=chosen_playbook
    )
    path = write_report(analysis, out)
    typer.echo(f"wrote {path}")


@app.command(name="evaluate-reasons")
def evaluate_reasons(
    history: HistoryOption,
    model: Annotated[
        str, typer.Option("--model", help="Model URI or directory.")
    ] = "models:/cancel-risk@champion",
    out_json: Annotated[
        Path | None, typer.Option("--out-json", help="Also write the figures as JSON here.")
    ] = None,
) -> None:
    """Our reasons and TreeSHAP's against a simulated history's true causes (--truth)."""
    from batch.models import ModelSourceError, load_scoring_model
    from core.errors import HistoryError
    from core.ingest import load_history
    from training.reason_quality import TruthCausesError, evaluate_history_reasons

    try:
        tables = load_history(history)
        scoring_model = load_scoring_model(model)
        quality = evaluate_history_reasons(scoring_model.risk_model, tables, history)
    except (HistoryError, ModelSourceError, TruthCausesError, OSError) as exc:
        raise fail(str(exc)) from None
    typer.echo(quality.format())
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(quality.to_dict(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {out_json}")


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option("--host", help="Address to bind (default 127.0.0.1, or CANCEL_RISK_HOST)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="Port (default 8000, or CANCEL_RISK_PORT)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="models:/<name>@<alias>, models:/<name>/<version> or a saved model directory "
            "(default models:/cancel-risk@champion, or CANCEL_RISK_MODEL_URI).",
        ),
    ] = None,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Also run the live order book: Ozon's push endpoint, the event routes, "
            "re-scoring and alerts (or CANCEL_RISK_LIVE=1).",
        ),
    ] = False,
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="The live book's database URL (implies --live; default "
            "sqlite:///~/.local/share/cancel-risk/book.db, or CANCEL_RISK_DB_URL).",
        ),
    ] = None,
) -> None:
    """Start the REST scoring service (keys and limits from CANCEL_RISK_* variables)."""
    from live.settings import LiveSettings
    from serving.settings import SettingsError

    try:
        settings = LiveSettings.from_env(
            host=host, port=port, model_uri=model, live=(live or db is not None) or None, db_url=db
        )
    except SettingsError as exc:
        raise fail(str(exc)) from None
    if settings.live:
        from live.alerts import parse_channels
        from live.app import run_live_server

        try:
            parse_channels(settings.alert_channels)
        except ValueError as exc:
            raise fail(str(exc)) from None
        run_live_server(settings)
    else:
        from serving.app import run_server

        run_server(settings)


@app.command()
def worker(
    db: Annotated[
        str | None,
        typer.Option("--db", help="The live book's database URL (or CANCEL_RISK_DB_URL)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model URI or directory (or CANCEL_RISK_MODEL_URI)."),
    ] = None,
) -> None:
    """Run the live book's re-scoring worker on its own (servers started with
    CANCEL_RISK_WORKER=false leave it to this), until interrupted."""
    import threading

    from live.settings import LiveSettings
    from live.worker import run_worker
    from serving.settings import SettingsError

    try:
        settings = LiveSettings.from_env(model_uri=model, live=True, db_url=db)
    except SettingsError as exc:
        raise fail(str(exc)) from None
    stop = threading.Event()
    try:
        run_worker(settings, stop, handle_signals=False)
    except KeyboardInterrupt:
        stop.set()


@app.command()
def archive(
    db: Annotated[
        str,
        typer.Option(
            "--db",
            help="The live book's database URL (sqlite:///path or postgresql://...).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="History directory to write (see data/CONTRACT.md).", show_default=False
        ),
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --out if it is not empty (a directory of files: a previous archive).",
        ),
    ] = False,
) -> None:
    """Write the live book as a history directory, atomically, for training and the batch."""
    from sqlalchemy.exc import SQLAlchemyError

    from live.archive import ArchiveError, archive_book
    from live.book import redacted

    try:
        report = archive_book(db, out, force=force)
    except ArchiveError as exc:
        raise fail(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise fail(f"cannot archive {redacted(db)}: {exc}") from None
    typer.echo(report.format())


@app.command()
def replay(
    history: HistoryOption,
    url: Annotated[
        str,
        typer.Option(
            "--url", help="The running service, e.g. http://127.0.0.1:8000.", show_default=False
        ),
    ],
    speed: Annotated[
        float,
        typer.Option(
            "--speed", min=0.0, help="Seconds of history per second of wall time; 0: at once."
        ),
    ] = 3600.0,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="ISO-8601 moment: replay only the postings open then or ordered later (their "
            "earlier records first, at once).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="X-API-Key sent to the event and posting routes."),
    ] = None,
    push_secret: Annotated[
        str | None,
        typer.Option("--push-secret", help="X-Push-Secret sent with each push."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="Requests in flight at once.")
    ] = 8,
    push_path: Annotated[
        str, typer.Option("--push-path", help="The service's push endpoint.")
    ] = "/v1/ozon/push",
) -> None:
    """Send a history's records to a running live service in time order, as Ozon would."""
    from batch.progress import build_progress
    from live.replay import replay_history, since_ns

    try:
        since_at = since_ns(since)
    except ValueError:
        raise fail(f"--since must be an ISO-8601 moment, not {since!r}") from None
    progress = build_progress()
    try:
        report = replay_history(
            history,
            url,
            speed=speed,
            since=since_at,
            api_key=api_key,
            push_secret=push_secret,
            concurrency=concurrency,
            push_path=push_path,
            progress=progress,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    finally:
        progress.close()
    typer.echo(report.format())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def show(
    scores: Annotated[Path, typer.Option("--scores", help="A `cancel-risk score` output file.")],
    top: Annotated[int, typer.Option("--top", min=1, help="How many of the riskiest.")] = 5,
) -> None:
    """Print the riskiest orders of a score file with their reasons and actions."""
    from training.scores import format_riskiest, load_scores

    try:
        frame = load_scores(scores)
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    typer.echo(format_riskiest(frame, top))
