"""Scoring requests with one loaded model: features, probability, risk level, reasons, decision.

A request goes through two steps:

1. **prepare** (:meth:`ModelScorer.prepare_fast`, else :meth:`ModelScorer.prepare_reference`):
   check ``as_of``, parse the records, check that the posting's dates are possible and that it
   is open at ``as_of``, and build its feature row with the one feature definition
   (:func:`core.features.build_feature_columns`). The fast route reads canonical requests
   through the request lane (:mod:`serving.request_lane`) straight into columns; the reference
   route (``tables_from_objects`` + ``build_features``, what training and the nightly batch
   run) handles everything else and words every rejection from the ingestion's own reasons.
2. **score** (:meth:`ModelScorer.score`): many prepared rows at once through the model's
   encoder, booster and calibrator and the batch's :class:`core.explain.Explainer`, so
   concurrent requests share one booster call (see :class:`MicroBatcher`).
   :meth:`ModelScorer.what_if` takes the same steps to the probabilities, then asks
   :mod:`core.whatif` for the risk after each action the seller can take.

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

from core.aggregates import HistoryAggregates, build_resolutions
from core.explain import LANGUAGES, Explainer, Explanation, build_explanations, row_fact_columns
from core.features import (
    CATEGORICAL_COLUMNS,
    FEATURE_COLUMNS,
    build_feature_columns,
    build_features,
)
from core.ingest import tables_from_objects
from core.model import RiskModel
from core.whatif import WhatIf, build_what_ifs
from serving.request_lane import (
    NotCanonical,
    ParsedRequest,
    build_closing,
    parse_request,
    requests_history,
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


@dataclass
class PreparedPosting:
    """A posting checked and ready to be scored: its feature row (keyed by column), or the
    parsed request it is computed from.

    Rows of the request lane are computed late: :meth:`ModelScorer.score` computes the rows of
    all its postings in one pass of the features, and reading :attr:`row` first computes this
    one alone.
    """

    posting_number: str
    as_of: int
    path: ScoringPath
    lang: str
    features: dict[str, Any] | None = None
    request: ParsedRequest | None = None
    aggregates: HistoryAggregates | None = None

    @property
    def row(self) -> dict[str, Any]:
        if self.features is None:
            complete_rows([self])
        assert self.features is not None
        return self.features


def complete_rows(prepared: Sequence[PreparedPosting]) -> None:
    """Compute the rows that wait for their features: one pass per model's aggregates."""
    waiting = [p for p in prepared if p.features is None]
    for aggregates in {id(p.aggregates): p.aggregates for p in waiting}.values():
        mine = [p for p in waiting if p.aggregates is aggregates]
        history, numbers = requests_history([p.request for p in mine])  # type: ignore[misc]
        columns = build_feature_columns(
            history,
            numbers,
            np.array([p.as_of for p in mine], dtype="int64"),
            aggregates,  # type: ignore[arg-type]
        )
        for k, posting in enumerate(mine):
            posting.features = {column: _plain(columns[column][k]) for column in FEATURE_COLUMNS}


@dataclass(frozen=True)
class ScoredPosting:
    posting_number: str
    as_of: int
    probability: float
    risk_level: str
    explanation: Explanation
    path: ScoringPath


@dataclass(frozen=True)
class PostingWhatIf:
    """A posting's probability now, and after each action that fits it (:mod:`core.whatif`)."""

    posting_number: str
    as_of: int
    probability: float
    risk_level: str
    currency: str | None
    actions: tuple[WhatIf, ...]
    path: ScoringPath


@dataclass(frozen=True)
class _Scores:
    """Prepared rows through the encoder, the booster and the calibrator."""

    rows: list[dict[str, Any]]
    matrix: np.ndarray
    raw: np.ndarray
    probabilities: np.ndarray
    levels: np.ndarray


def posting_currency(posting: Any) -> str | None:
    """The currency of a posting object as the Seller API sends it: the first product's
    non-empty ``currency_code`` (trimmed, as the ingestion reads it); None when there is none,
    whatever shape the object has."""
    products = posting.get("products") if isinstance(posting, dict) else None
    if not isinstance(products, list):
        return None
    for product in products:
        code = product.get("currency_code") if isinstance(product, dict) else None
        if isinstance(code, str) and code.strip():
            return code.strip()
    return None


def _ns(value: Any) -> int | None:
    return None if pd.isna(value) else int(pd.Timestamp(value).value)


def _plain(value: Any) -> Any:
    """A feature value as a row holds it: str or None, or a Python float."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, str):
        return value
    return float(value)


def build_feature_frame(
    rows: Sequence[dict[str, Any]], posting_numbers: Sequence[str]
) -> pd.DataFrame:
    """Feature rows as the frame ``build_features`` returns (same columns, dtypes and index)."""
    data = {}
    for column in FEATURE_COLUMNS:
        values = [row[column] for row in rows]
        if column in CATEGORICAL_COLUMNS:
            data[column] = pd.array(values, dtype="string")
        else:
            data[column] = np.asarray(values, dtype="float64")
    index = pd.Index(list(posting_numbers), dtype="string", name="posting_number")
    return pd.DataFrame(data, index=index)


class ModelScorer:
    """Prepares and scores requests with one :class:`RiskModel`.

    ``fast_path`` asks for the request lane; it is used only when the model carries the
    history aggregates it learned, and has passed :meth:`check_fast_path` (see
    ``fast_path_note``).
    """

    def __init__(self, model: RiskModel, *, fast_path: bool = True) -> None:
        self.model = model
        self.explainer = Explainer(model)
        self.fast = False
        self.fast_path_note: str | None = None
        if not fast_path:
            self.fast_path_note = "turned off by the settings"
        elif model.aggregates is None:
            self.fast_path_note = "the model carries no history aggregates"
        else:
            self.fast = True

    @property
    def path(self) -> ScoringPath:
        return "fast" if self.fast else "reference"

    # --- prepare ------------------------------------------------------------------------------

    def resolve_as_of(self, job: ScoreJob, now: int, max_skew_seconds: float, prefix: Loc) -> int:
        as_of = now if job.as_of is None else job.as_of
        errors = as_of_errors(as_of, now, max_skew_seconds, (*prefix, "as_of"))
        if errors:
            raise RequestRejected(errors)
        return as_of

    def prepare_fast(self, job: ScoreJob, as_of: int, prefix: Loc) -> PreparedPosting | None:
        """The feature row by the request lane; None when the request is not canonical."""
        if not self.fast:
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
        return PreparedPosting(
            parsed.posting_number,
            as_of,
            "fast",
            job.lang,
            request=parsed,
            aggregates=self.model.aggregates,
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
        return PreparedPosting(number, as_of, "reference", job.lang, features=row)

    # --- score --------------------------------------------------------------------------------

    def _score_rows(self, prepared: Sequence[PreparedPosting]) -> _Scores:
        """``RiskModel.score_features`` step by step on the rows as dicts: the same encoder,
        booster and calibrator, without a feature frame."""
        complete_rows(prepared)
        rows = [p.row for p in prepared]
        matrix = self.model.build_matrix_from_rows(rows)
        raw = self.model.predict_matrix_raw(matrix)
        probabilities = self.model.calibrator.transform(raw)
        if not np.all(np.isfinite(probabilities)):
            raise FloatingPointError("the model returned a probability that is not finite")
        return _Scores(rows, matrix, raw, probabilities, self.model.risk_levels(probabilities))

    def score(self, prepared: Sequence[PreparedPosting]) -> list[ScoredPosting]:
        """Probabilities, levels and explanations of prepared rows, in their order.

        :meth:`_score_rows`, then ``build_explanations`` step by step with the batch's
        explainer.
        """
        if not prepared:
            return []
        scores = self._score_rows(prepared)
        rows, probabilities = scores.rows, scores.probabilities
        explanations: list[Explanation | None] = [None] * len(prepared)
        langs = [p.lang for p in prepared]
        for lang in dict.fromkeys(langs):
            group = [i for i, value in enumerate(langs) if value == lang]
            for i, explanation in zip(
                group,
                self.explain(rows, group, scores.matrix, scores.raw, probabilities, lang),
                strict=True,
            ):
                explanations[i] = explanation
        return [
            ScoredPosting(
                posting_number=p.posting_number,
                as_of=p.as_of,
                probability=float(probabilities[i]),
                risk_level=str(scores.levels[i]),
                explanation=explanations[i],  # type: ignore[arg-type]
                path=p.path,
            )
            for i, p in enumerate(prepared)
        ]

    def what_if(
        self, prepared: Sequence[PreparedPosting], currencies: Sequence[str | None]
    ) -> list[PostingWhatIf]:
        """Each prepared posting's probability (as :meth:`score` gives it) and its risk after
        each action that fits it, titled in its language; ``currencies`` are the postings'
        currencies (:func:`posting_currency`), the refund's unit."""
        if len(currencies) != len(prepared):
            raise ValueError(f"{len(currencies)} currencies for {len(prepared)} postings")
        if not prepared:
            return []
        scores = self._score_rows(prepared)

        def column(name: str) -> np.ndarray:
            values = [row[name] for row in scores.rows]
            return np.array([np.nan if v is None else v for v in values], dtype="float64")

        explainer = self.explainer
        actions = build_what_ifs(
            self.model,
            scores.matrix,
            scores.raw,
            scores.probabilities,
            column("is_handed_over"),
            column("order_value_rub"),
            column("price_change_pct"),
            currencies,
            [p.lang for p in prepared],
            playbook=explainer.playbook,
            costs=explainer.costs,
            reference=explainer.reference_codes,
        )
        return [
            PostingWhatIf(
                posting_number=p.posting_number,
                as_of=p.as_of,
                probability=float(scores.probabilities[i]),
                risk_level=str(scores.levels[i]),
                currency=currencies[i],
                actions=tuple(actions[i]),
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
        if self.fast:
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
