"""The live book's worker: re-scores what changed, sweeps every open posting, sends the alerts.

It runs in a process of its own beside the web server (:func:`start_worker_process`), so that
scoring, which keeps a core busy, never delays the answer to a push; the two share nothing but
the database. Each turn (:meth:`Rescorer.turn`):

1. a sweep, when one is due (``CANCEL_RISK_SWEEP_SECONDS`` since the last, hourly by default:
   silence and lateness grow without any event) or was asked for (``POST /v1/live/sweep``):
   every open posting is scored at one moment;
2. otherwise the postings that received records since their last score (``pending``), the
   longest waiting first, up to ``CANCEL_RISK_RESCORE_BATCH`` at a time;
3. the alerts that are due (:class:`live.alerts.AlertSender`).

Scores come from the one scoring path (:class:`serving.scoring.ModelScorer`: the request lane,
else the reference route) on the records the book holds (:func:`live.book.score_inputs`), at
the moment of the book's clock: the present (``CANCEL_RISK_CLOCK=wall``) or the latest record
time (``events``, for replays). A score, the posting's new state and the alerts it raises are
committed together (:func:`live.book.record_scores`). A posting the scorer refuses as closed
is closed in the book; one it refuses for its data keeps the reason as its ``note``.

The worker loads the champion like the service (:class:`serving.model_store.ModelStore`, with
the same settings and cache) and checks for a new version every ``model_poll_seconds`` (or every
minute). It ends when asked, or when the server process that started it is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine

from core.explain import LANGUAGES, explanation_to_dict
from live.book import (
    WRITES,
    AlertRule,
    OrderBook,
    PendingPosting,
    ScoreRecord,
    Unscored,
    open_postings,
    pending_postings,
    read_clock,
    read_last_sweep,
    record_scores,
    score_inputs,
    take_sweep_request,
    write_last_sweep,
    write_sweep_done,
)
from live.dashboard import build_book_cause_analysis, read_cause_analysis, write_cause_analysis
from live.settings import LiveSettings
from serving.app import wall_clock_ns
from serving.model_store import LoadedModel, ModelStore
from serving.scoring import PreparedPosting, ScoredPosting, ScoreJob, complete_rows
from serving.state import score_isolated
from serving.validation import RequestRejected

logger = logging.getLogger(__name__)

_NS = 1_000_000_000
COMMIT_ROWS = 8  # scores per write transaction: pushes wait while one commits
WORKER_NICENESS = 10  # the server answers pushes first when both want the CPU
_NOT_OPEN = "value_error.not_open"


@dataclass
class TurnReport:
    scored: int = 0
    unscored: int = 0
    alerts_raised: int = 0
    alerts_sent: int = 0
    swept: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.scored or self.unscored or self.alerts_sent or self.swept)


class Rescorer:
    """Scores the book's postings with the loaded model; see the module docstring."""

    def __init__(
        self,
        settings: LiveSettings,
        engine: Engine,
        model: Callable[[], LoadedModel | None],
        *,
        channel_names: Sequence[str] = (),
        sender: Any = None,
        wall: Callable[[], int] = wall_clock_ns,
        interrupted: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.interrupted = interrupted
        self.engine = engine
        self.writes = engine.execution_options(**{WRITES: True})
        self.model = model
        self.channel_names = tuple(channel_names)
        self.sender = sender
        self.wall = wall
        self.rule = AlertRule(level=settings.alert_level, step=settings.alert_step)

    def now(self) -> int | None:
        """The scoring moment: the present, or the book's clock (None while the book is empty)."""
        if self.settings.clock == "wall":
            return self.wall()
        with self.engine.connect() as connection:
            clock = read_clock(connection)
        return None if clock is None else min(clock, self.wall())

    def turn(self) -> TurnReport:
        report = TurnReport()
        now = self.now()
        loaded = self.model()
        if now is not None and loaded is not None:
            with self.writes.begin() as connection:
                requested = take_sweep_request(connection)
                last = read_last_sweep(connection)
            if requested or last is None or now - last >= self.settings.sweep_seconds * _NS:
                self.sweep(loaded, now, report, requested)
            else:
                with self.engine.connect() as connection:
                    pending = pending_postings(connection, self.settings.rescore_batch)
                if pending:
                    self.score(loaded, pending, now, "event", report)
        if self.sender is not None:
            report.alerts_sent = self.sender.send_due().sent
        return report

    def sweep(
        self, loaded: LoadedModel, as_of: int, report: TurnReport, request: str | None = None
    ) -> None:
        """Score every open posting at ``as_of``, a batch per transaction; then note the sweep
        (and the ``request`` it answers)."""
        with self.engine.connect() as connection:
            postings = open_postings(connection)
        size = self.settings.rescore_batch
        for start in range(0, len(postings), size):
            if self.interrupted():
                return  # not noted: the next start sweeps again
            self.score(loaded, postings[start : start + size], as_of, "sweep", report)
        self.analyse_causes(loaded, as_of)
        with self.writes.begin() as connection:
            write_last_sweep(connection, as_of)
            if request is not None:
                write_sweep_done(connection, request)
        report.swept = True
        logger.info("sweep at %s: %d open postings scored", as_of, len(postings))

    def analyse_causes(self, loaded: LoadedModel, as_of: int) -> None:
        """The dashboard's cause analysis at ``as_of``, when the kept one is older than
        ``causes_seconds`` or was made by another model version. It never fails a sweep."""
        with self.engine.connect() as connection:
            held = read_cause_analysis(connection)
        if (
            held is not None
            and held.get("model_version") == loaded.record.version
            and as_of - int(held["as_of"]) < self.settings.causes_seconds * _NS
        ):
            return
        started = time.monotonic()
        try:
            with self.engine.connect() as connection:
                analysis = build_book_cause_analysis(
                    connection, loaded.model, as_of, loaded.record.version
                )
            with self.writes.begin() as connection:
                write_cause_analysis(connection, analysis)
        except Exception as exc:
            logger.error("cause analysis failed: %s: %s", type(exc).__name__, exc)
            return
        logger.info("cause analysis at %s in %.1f s", as_of, time.monotonic() - started)

    def score(
        self,
        loaded: LoadedModel,
        postings: Sequence[PendingPosting],
        as_of: int,
        trigger: str,
        report: TurnReport,
    ) -> None:
        """Score ``postings`` at ``as_of`` and commit the scores, closings and alerts."""
        scorer = loaded.scorer
        with self.engine.connect() as connection:
            inputs = score_inputs(connection, [p.posting_number for p in postings])
        prepared: list[tuple[PendingPosting, PreparedPosting]] = []
        unscored: list[Unscored] = []
        for pending in postings:
            held = inputs.get(pending.posting_number)
            if held is None:
                continue
            job = ScoreJob(held.posting, held.pushes, held.prices, held.tracking, as_of=as_of)
            where = ("book", pending.posting_number)
            try:
                row = scorer.prepare_fast(job, as_of, where) or scorer.prepare_reference(
                    job, as_of, where
                )
            except RequestRejected as exc:
                unscored.append(_unscored(pending, exc))
                continue
            except Exception as exc:
                logger.error("%s could not be prepared: %s", pending.posting_number, exc)
                unscored.append(
                    Unscored(pending.posting_number, pending.event_seq, False, f"error: {exc}")
                )
                continue
            prepared.append((pending, row))
        records = self._scored(loaded, prepared, as_of, trigger, unscored)
        # Short write transactions: on SQLite a push waits for the write lock while one runs.
        step = COMMIT_ROWS
        for start in range(0, max(len(records), len(unscored)), step):
            with self.writes.begin() as connection:
                alerts = record_scores(
                    connection,
                    records[start : start + step],
                    unscored[start : start + step],
                    scored_at=self.wall(),
                    rule=self.rule,
                    channels=self.channel_names,
                )
            report.alerts_raised += len(alerts)
        report.scored += len(records)
        report.unscored += len(unscored)

    def _scored(
        self,
        loaded: LoadedModel,
        prepared: Sequence[tuple[PendingPosting, PreparedPosting]],
        as_of: int,
        trigger: str,
        unscored: list[Unscored],
    ) -> list[ScoreRecord]:
        """Probabilities, levels and explanations in every language of the prepared rows."""
        if not prepared:
            return []
        rows = [row for _, row in prepared]
        complete_rows(rows)
        by_lang: dict[str, list[ScoredPosting | Exception]] = {
            lang: score_isolated(loaded.scorer, [replace(row, lang=lang) for row in rows])
            for lang in LANGUAGES
        }
        records = []
        for k, (pending, _) in enumerate(prepared):
            outcomes = [by_lang[lang][k] for lang in LANGUAGES]
            failed = next((o for o in outcomes if isinstance(o, Exception)), None)
            if failed is not None:
                logger.error("%s could not be scored: %s", pending.posting_number, failed)
                unscored.append(
                    Unscored(pending.posting_number, pending.event_seq, False, f"error: {failed}")
                )
                continue
            first: ScoredPosting = outcomes[0]  # type: ignore[assignment]
            records.append(
                ScoreRecord(
                    posting_number=pending.posting_number,
                    event_seq=pending.event_seq,
                    as_of=as_of,
                    trigger=trigger,
                    model_name=loaded.record.name,
                    model_version=loaded.record.version,
                    probability=first.probability,
                    risk_level=first.risk_level,
                    explanations={
                        lang: explanation_to_dict(outcome.explanation)  # type: ignore[union-attr]
                        for lang, outcome in zip(LANGUAGES, outcomes, strict=True)
                    },
                )
            )
        return records


def _unscored(pending: PendingPosting, exc: RequestRejected) -> Unscored:
    """Why a posting was refused: closed (a closing at or before as_of, or a final status with
    no time), not ordered yet by the book's clock (left open), or its data."""
    error = exc.errors[0]
    not_open = error.type == _NOT_OPEN
    not_yet = not_open and error.loc[-1] == "in_process_at"
    return Unscored(pending.posting_number, pending.event_seq, not_open and not not_yet, error.msg)


# --- the process ----------------------------------------------------------------------------------


def run_worker(
    settings: LiveSettings,
    stop: Any,
    parent_pid: int | None = None,
    *,
    handle_signals: bool = True,
) -> None:
    """The worker's loop until ``stop`` is set or the parent process is gone.

    Beside a server (``handle_signals``), SIGTERM and SIGINT are ignored: the server stops it.
    """
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    # httpx logs every request's URL at INFO, and a robot's URL holds its key.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from live.alerts import AlertSender, parse_channels
    from serving.model_loading import apply_registry_settings

    # The server stops the worker through ``stop``; a SIGTERM or Ctrl-C sent to the whole
    # process group (systemd, a terminal) must not kill it while it waits on that event (the
    # server's set() would then wait forever for the dead waiter).
    if handle_signals:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_registry_settings(settings)
    os.nice(WORKER_NICENESS)
    book = OrderBook(settings.db_url.get_secret_value())
    # A cache of its own: two processes writing one cache could leave its pointer dangling.
    store = ModelStore(
        settings.model_copy(update={"model_cache_dir": settings.model_cache_dir / "worker"})
    )
    channels = parse_channels(settings.alert_channels)
    sender = (
        AlertSender(book.writes, channels, public_url=settings.public_url, now_ns=wall_clock_ns)
        if channels
        else None
    )

    def orphaned() -> bool:
        return parent_pid is not None and os.getppid() != parent_pid

    rescorer = Rescorer(
        settings,
        book.engine,
        lambda: store.current,
        channel_names=[channel.name for channel in channels],
        sender=sender,
        interrupted=lambda: stop.is_set() or orphaned(),
    )
    poll_seconds = settings.model_poll_seconds or 60.0
    next_poll = time.monotonic() + poll_seconds
    try:
        while not stop.is_set():
            if orphaned():
                logger.warning("the server process is gone: the worker stops")
                return
            if store.current is None:
                store.load_initial()
                if store.current is None:
                    logger.error("no model: re-scoring waits (%s)", store.last_error)
                    stop.wait(min(30.0, poll_seconds))
                    continue
            elif time.monotonic() >= next_poll:
                store.check_for_update()
                next_poll = time.monotonic() + poll_seconds
            try:
                report = rescorer.turn()
            except Exception as exc:  # the database may be away for a while: keep trying
                logger.error("worker turn failed: %s: %s", type(exc).__name__, exc)
                stop.wait(5.0)
                continue
            if not report.busy:
                stop.wait(settings.rescore_interval_seconds)
    finally:
        book.close()


@dataclass
class WorkerProcess:
    process: Any
    stop_event: Any

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_event.set()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def start_worker_process(settings: LiveSettings) -> WorkerProcess:
    """The worker in a process of its own (spawned: it shares no state with the server)."""
    context = multiprocessing.get_context("spawn")
    stop_event = context.Event()
    process = context.Process(
        target=run_worker,
        args=(settings, stop_event, os.getpid()),
        name="cancel-risk-worker",
        daemon=True,
    )
    process.start()
    return WorkerProcess(process, stop_event)
