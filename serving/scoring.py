"""Scoring requests with one loaded model: features, probability, risk level, reasons, decision.

A request goes through two steps:

1. **prepare** (:meth:`ModelScorer.prepare_fast`, else :meth:`ModelScorer.prepare_reference`):
   check ``as_of``, parse the records, check that the posting's dates are possible and that it
   is open at ``as_of``, and build its feature row. The fast path (:mod:`serving.fast_path`)
   handles canonical requests in ~0.1 ms; the reference path (``tables_from_objects`` +
   ``build_features``, the code training and the nightly batch run) handles everything else and
   words every rejection from the ingestion's own reasons. Both give the same row.
2. **score** (:meth:`ModelScorer.score`): many prepared rows at once through the model's
   encoder, booster and calibrator and the batch's :class:`core.explain.Explainer`, so
   concurrent requests share one booster call (see :class:`MicroBatcher`).

Each model is checked on probe requests when it is loaded (:meth:`ModelScorer.check_fast_path`):
a model whose two routes disagree anywhere is refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import pandas as pd

from core.aggregates import build_resolutions
from core.explain import LANGUAGES, Explainer, Explanation, build_explanations, row_fact_columns
from core.features import CATEGORICAL_COLUMNS, FEATURE_COLUMNS, build_features
from core.ingest import tables_from_objects
from core.model import RiskModel
from serving.fast_path import (
    HISTORY_COLUMNS,
    FastFeatureBuilder,
    NotCanonical,
    ParsedRequest,
    build_closing,
    build_feature_frame,
    fast_path_supports,
    parse_request,
)
from serving.validation import (
    FieldError,
    Loc,
    RequestRejected,
    as_of_errors,
    not_open_error,
    plausibility_errors,
    reject_errors,
)

logger = logging.getLogger(__name__)

ScoringPath = Literal["fast", "reference"]
REQUEST_SOURCE = "request"


@dataclass(frozen=True)
class ScoreJob:
    """One posting to score: the request's records as decoded JSON, ``as_of`` in UTC ns."""

    posting: Any
    pushes: Sequence[Any] = ()
    prices: Sequence[Any] = ()
    tracking: Sequence[Any] = ()
    as_of: int | None = None
    lang: str = "en"


@dataclass(frozen=True)
class PreparedPosting:
    """A posting's feature row, ready to be scored.

    A fast-path row gets its history aggregates late (``builder`` and ``parsed`` are kept for
    it): :meth:`ModelScorer.score` looks them up for all its rows in one call, and reading
    :attr:`row` first looks up this one alone.
    """

    posting_number: str
    as_of: int
    features: dict[str, Any]
    path: ScoringPath
    lang: str
    builder: FastFeatureBuilder | None = None
    parsed: ParsedRequest | None = None

    @property
    def row(self) -> dict[str, Any]:
        complete_history([self])
        return self.features

    @property
    def needs_history(self) -> bool:
        return self.builder is not None and HISTORY_COLUMNS[0] not in self.features


def complete_history(prepared: Sequence[PreparedPosting]) -> None:
    """Add the history aggregates to the rows that wait for them, one lookup per builder."""
    waiting = [p for p in prepared if p.needs_history]
    for builder in {id(p.builder): p.builder for p in waiting}.values():
        mine = [p for p in waiting if p.builder is builder]
        builder.add_history(  # type: ignore[union-attr]
            [p.features for p in mine], [p.parsed for p in mine], [p.as_of for p in mine]
        )


@dataclass(frozen=True)
class ScoredPosting:
    posting_number: str
    as_of: int
    probability: float
    risk_level: str
    explanation: Explanation
    path: ScoringPath


def _ns(value: Any) -> int | None:
    return None if pd.isna(value) else int(pd.Timestamp(value).value)


def _plain(value: Any) -> Any:
    """A feature value as the fast path holds it: str or None, or a Python float."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, str):
        return value
    return float(value)


class ModelScorer:
    """Prepares and scores requests with one :class:`RiskModel`.

    ``fast_path`` asks for the pandas-free path; it is used only when it supports the model's
    feature version and has passed :meth:`check_fast_path` (see ``fast_path_note``).
    """

    def __init__(self, model: RiskModel, *, fast_path: bool = True) -> None:
        self.model = model
        self.explainer = Explainer(model)
        self.fast: FastFeatureBuilder | None = None
        self.fast_path_note: str | None = None
        if not fast_path:
            self.fast_path_note = "turned off by the settings"
        elif model.aggregates is None:
            self.fast_path_note = "the model carries no history aggregates"
        elif not fast_path_supports(model.feature_version):
            self.fast_path_note = (
                f"the fast path does not compute feature version {model.feature_version!r}"
            )
        else:
            self.fast = FastFeatureBuilder(model.aggregates)

    @property
    def path(self) -> ScoringPath:
        return "fast" if self.fast is not None else "reference"

    # --- prepare ------------------------------------------------------------------------------

    def resolve_as_of(self, job: ScoreJob, now: int, max_skew_seconds: float, prefix: Loc) -> int:
        as_of = now if job.as_of is None else job.as_of
        errors = as_of_errors(as_of, now, max_skew_seconds, (*prefix, "as_of"))
        if errors:
            raise RequestRejected(errors)
        return as_of

    def prepare_fast(self, job: ScoreJob, as_of: int, prefix: Loc) -> PreparedPosting | None:
        """The feature row by the fast path; None when the request is not canonical."""
        if self.fast is None:
            return None
        try:
            parsed = parse_request(job.posting, job.pushes, job.prices, job.tracking)
        except NotCanonical:
            return None
        errors = plausibility_errors(
            parsed.ordered_at,
            parsed.handed_over_at,
            parsed.shipment_deadline_at,
            parsed.promised_begin_at,
            parsed.promised_end_at,
            prefix,
        )
        closing = build_closing(parsed)
        not_open = not_open_error(
            closing.status,
            parsed.ordered_at,
            closing.closed_at,
            closing.closing_time_unknown,
            as_of,
            prefix,
        )
        _raise_if(errors, not_open)
        row = self.fast.build_row(parsed, as_of)
        return PreparedPosting(
            parsed.posting_number, as_of, row, "fast", job.lang, builder=self.fast, parsed=parsed
        )

    def prepare_reference(self, job: ScoreJob, as_of: int, prefix: Loc) -> PreparedPosting:
        """The feature row by ``tables_from_objects`` and ``build_features``."""
        tables = tables_from_objects(
            [job.posting],
            pushes=job.pushes,
            prices=job.prices,
            tracking=job.tracking,
            source=REQUEST_SOURCE,
        )
        if len(tables.rejects):
            raise RequestRejected(reject_errors(tables.rejects, prefix))
        postings = tables.postings
        posting = postings.iloc[0]
        ordered_at = _ns(posting["ordered_at"])
        assert ordered_at is not None  # ingestion rejects a posting without an order time
        errors = plausibility_errors(
            ordered_at,
            _ns(posting["handed_over_at"]),
            _ns(posting["shipment_deadline_at"]),
            _ns(posting["promised_delivery_begin_at"]),
            _ns(posting["promised_delivery_end_at"]),
            prefix,
        )
        resolution = build_resolutions(postings).iloc[0]
        status = None if pd.isna(posting["status"]) else str(posting["status"])
        not_open = not_open_error(
            status,
            ordered_at,
            _ns(resolution["closed_at"]),
            bool(resolution["closing_time_unknown"]),
            as_of,
            prefix,
        )
        _raise_if(errors, not_open)
        moment = pd.Timestamp(as_of, tz="UTC")
        features = build_features(tables, moment, aggregates=self.model.aggregates)
        number = str(posting["posting_number"])
        if number not in features.index:
            message = "the posting is not open at as_of"
            raise RequestRejected([FieldError((*prefix, "posting"), message, "value_error")])
        values = features.loc[number]
        row = {column: _plain(values[column]) for column in FEATURE_COLUMNS}
        return PreparedPosting(number, as_of, row, "reference", job.lang)

    # --- score --------------------------------------------------------------------------------

    def score(self, prepared: Sequence[PreparedPosting]) -> list[ScoredPosting]:
        """Probabilities, levels and explanations of prepared rows, in their order.

        ``RiskModel.score_features`` and ``build_explanations`` step by step on the rows as
        dicts: the same encoder, calibrator and explainer, without a feature frame.
        """
        if not prepared:
            return []
        complete_history(prepared)
        rows = [p.row for p in prepared]
        matrix = self.model.build_matrix_from_rows(rows)
        raw = self.model.predict_matrix_raw(matrix)
        probabilities = self.model.calibrator.transform(raw)
        if not np.all(np.isfinite(probabilities)):
            raise FloatingPointError("the model returned a probability that is not finite")
        levels = self.model.risk_levels(probabilities)
        explanations: list[Explanation | None] = [None] * len(prepared)
        langs = [p.lang for p in prepared]
        for lang in dict.fromkeys(langs):
            group = [i for i, value in enumerate(langs) if value == lang]
            for i, explanation in zip(
                group, self.explain(rows, group, matrix, raw, probabilities, lang), strict=True
            ):
                explanations[i] = explanation
        return [
            ScoredPosting(
                posting_number=p.posting_number,
                as_of=p.as_of,
                probability=float(probabilities[i]),
                risk_level=str(levels[i]),
                explanation=explanations[i],  # type: ignore[arg-type]
                path=p.path,
            )
            for i, p in enumerate(prepared)
        ]

    def explain(
        self,
        rows: Sequence[dict[str, Any]],
        group: Sequence[int],
        matrix: np.ndarray,
        raw: np.ndarray,
        probabilities: np.ndarray,
        lang: str,
    ) -> list[Explanation]:
        """``build_explanations`` of the rows at ``group`` positions, in one language."""
        chosen = [rows[i] for i in group]
        handed_over = np.array([row["is_handed_over"] for row in chosen], dtype="float64")
        return self.explainer.explain_matrix(
            probabilities[group],
            np.nan_to_num(handed_over, nan=0.0),
            np.arange(len(group)),
            matrix[group],
            raw[group],
            lambda explained: row_fact_columns([chosen[i] for i in explained.tolist()]),
            lang,
        ).to_explanations()

    # --- self-check ---------------------------------------------------------------------------

    def check_fast_path(self, jobs: Sequence[ScoreJob], as_of: int) -> None:
        """Score ``jobs`` by both routes; :class:`RoutesDisagree` when they differ anywhere.

        The reference route is the batch's: ``tables_from_objects`` + ``build_features``, a
        feature frame, ``RiskModel.score_features`` and ``build_explanations``. The service's
        route is the fast path's rows (when it has one) through :meth:`score`. Rows, then
        probabilities, then explanations in every language must be equal. A model that cannot
        score the probes at all raises what went wrong.
        """
        reference = [self.prepare_reference(job, as_of, ("probe", i)) for i, job in enumerate(jobs)]
        numbers = [p.posting_number for p in reference]
        frame = build_feature_frame([p.row for p in reference], numbers)
        expected = self.model.score_features(frame)
        if not np.all(np.isfinite(expected)):
            raise FloatingPointError("the model returned a probability that is not finite")
        prepared = reference
        if self.fast is not None:
            prepared = [self._fast_probe(job, as_of, i, reference[i]) for i, job in enumerate(jobs)]
        for lang in LANGUAGES:
            served = self.score([replace(p, lang=lang) for p in prepared])
            probabilities = np.array([s.probability for s in served])
            if not np.array_equal(probabilities, expected):
                raise RoutesDisagree("probabilities differ from RiskModel.score_features")
            if [s.explanation for s in served] != build_explanations(
                self.model, frame, expected, lang=lang
            ):
                raise RoutesDisagree(f"explanations ({lang}) differ from build_explanations")

    def _fast_probe(
        self, job: ScoreJob, as_of: int, i: int, reference: PreparedPosting
    ) -> PreparedPosting:
        try:
            fast = self.prepare_fast(job, as_of, ("probe", i))
        except RequestRejected as exc:
            message = f"probe {i}: the fast path rejected it ({exc.errors[0].msg})"
            raise RoutesDisagree(message) from exc
        if fast is None:
            raise RoutesDisagree(f"probe {i} is not canonical to the fast path")
        difference = first_difference(fast.row, reference.row)
        if difference is not None:
            raise RoutesDisagree(f"probe {i}: features differ from build_features: {difference}")
        return fast


class RoutesDisagree(Exception):
    """The service's route and the batch's give a probe request different results."""


def first_difference(
    fast: dict[str, Any], reference: dict[str, Any], tol: float = 1e-9
) -> str | None:
    """The first feature where two rows differ (beyond ``tol``, relative), or None."""
    for column in FEATURE_COLUMNS:
        a, b = fast.get(column), reference.get(column)
        if column in CATEGORICAL_COLUMNS:
            if a != b:
                return f"{column}: {a!r} != {b!r}"
            continue
        if a is None or b is None:
            return f"{column}: {a!r} != {b!r}"
        if math.isnan(a) and math.isnan(b):
            continue
        if not math.isclose(a, b, rel_tol=tol, abs_tol=tol):
            return f"{column}: {a!r} != {b!r}"
    return None


def _raise_if(errors: list[FieldError], not_open: FieldError | None) -> None:
    if not_open is not None:
        errors = [*errors, not_open]
    if errors:
        raise RequestRejected(errors)


# --- batching concurrent requests --------------------------------------------------------------

J = TypeVar("J")
R = TypeVar("R")


class MicroBatcher(Generic[J, R]):
    """Runs ``process`` on the jobs that are waiting together, in the event loop, without delay.

    A submitted job schedules a run for the next turn of the loop; every request handler that
    is ready in the same turn adds its job first, so concurrent requests share one call while a
    lone request is processed at once. ``process`` returns one result (or exception) per job.
    """

    def __init__(self, process: Callable[[list[J]], list[R | BaseException]], max_batch: int):
        self._process = process
        self._max_batch = max_batch
        self._pending: list[tuple[J, asyncio.Future[R]]] = []
        self._scheduled = False
        self.batches = 0
        self.jobs = 0

    async def submit(self, job: J) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((job, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run)
        return await future

    def _run(self) -> None:
        batch = self._pending[: self._max_batch]
        self._pending = self._pending[self._max_batch :]
        if self._pending:
            asyncio.get_running_loop().call_soon(self._run)
        else:
            self._scheduled = False
        live = [(job, future) for job, future in batch if not future.cancelled()]
        if not live:
            return
        self.batches += 1
        self.jobs += len(live)
        try:
            results = self._process([job for job, _ in live])
        except Exception as exc:  # every waiting request gets the failure, none hangs
            results = [exc] * len(live)
        for (_, future), result in zip(live, results, strict=True):
            if future.cancelled():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
