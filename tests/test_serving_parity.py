"""Parity: the service's fast path, the reference path, the batch path and the training path.

- The fast path's feature rows equal ``build_features`` on the same records (simulated requests
  and generated ones with ties, mixed currencies, every push kind, events after ``as_of``), and
  it never accepts a request the ingestion would reject.
- Its value parsers agree with the ingestion's converters on the values they accept.
- A probability from ``POST /v1/score`` equals ``RiskModel.score_tables`` (the nightly batch)
  and ``build_feature_rows`` + ``score_features`` (the training set's path) to 1e-9.
- A model whose features the fast path does not reproduce is served by the reference path.
"""

from __future__ import annotations

import copy
import math
import random
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import core.ingest.values as ingest_values
from cancel_risk.examples import (
    HistoryRecords,
    build_score_request,
    load_history_records,
    open_score_requests,
)
from core.explain import build_explanations
from core.features import (
    CATEGORICAL_COLUMNS,
    FEATURE_COLUMNS,
    build_feature_rows,
    build_features,
)
from core.ingest import tables_from_objects
from core.ingest.values import (
    build_decimals,
    build_integers,
    build_strings,
    build_utc_timestamps,
    parse_decimal,
    parse_integer,
    parse_text,
    parse_timestamp,
)
from core.playbook import LANGUAGES
from serving import scoring
from serving.app import create_app
from serving.probes import build_probe_jobs
from serving.scoring import (
    ModelScorer,
    PreparedPosting,
    RoutesDisagree,
    ScoreJob,
    build_feature_frame,
    complete_rows,
    first_difference,
)
from serving.settings import ServiceSettings
from serving.validation import RequestRejected

KEY = "parity-key"
HOUR_NS = 3_600_000_000_000


@pytest.fixture(scope="module")
def records(trained_shop) -> HistoryRecords:
    return load_history_records(trained_shop.history_dir)


@pytest.fixture(scope="module")
def scorer(trained_shop) -> ModelScorer:
    return ModelScorer(trained_shop.model, fast_path=True)


@pytest.fixture(scope="module")
def client(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServiceSettings(
        model_uri=str(trained_model_dir),
        api_keys=(KEY,),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
    )
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as test_client:
        yield test_client


def _job(request: dict[str, Any], as_of: int) -> ScoreJob:
    return ScoreJob(
        posting=request["posting"],
        pushes=request.get("pushes", []),
        prices=request.get("prices", []),
        tracking=request.get("tracking", []),
        as_of=as_of,
    )


def _both_paths(
    scorer: ModelScorer, job: ScoreJob
) -> tuple[PreparedPosting | RequestRejected | None, PreparedPosting | RequestRejected]:
    assert job.as_of is not None
    try:
        fast: PreparedPosting | RequestRejected | None = scorer.prepare_fast(job, job.as_of, ())
    except RequestRejected as exc:
        fast = exc
    try:
        reference: PreparedPosting | RequestRejected = scorer.prepare_reference(job, job.as_of, ())
    except RequestRejected as exc:
        reference = exc
    return fast, reference


def _assert_same_outcome(fast: Any, reference: Any) -> bool:
    """Both paths agree; returns whether the fast path computed a row."""
    if fast is None:
        return False
    if isinstance(fast, RequestRejected):
        assert isinstance(reference, RequestRejected), "the fast path refused an open posting"
        assert fast.errors == reference.errors
        return False
    assert isinstance(reference, PreparedPosting), (
        f"the fast path scored what the reference refuses: {reference.errors}"
    )
    assert fast.posting_number == reference.posting_number
    assert first_difference(fast.row, reference.row) is None
    return True


# --- simulated requests ----------------------------------------------------------------------


def test_fast_rows_equal_build_features_on_simulated_requests(
    records: HistoryRecords, scorer: ModelScorer
) -> None:
    rng = random.Random(7)
    postings = rng.sample(records.postings, 24)
    compared = exact = 0
    for k, posting in enumerate(postings):
        ordered = parse_timestamp(posting["in_process_at"])
        assert ordered is not None
        for hours in (0, 30, 200):
            as_of = ordered + hours * HOUR_NS + 1_000
            # Every other request also carries the events after as_of: both paths ignore them.
            request = build_score_request(records, posting, as_of, known_only=bool(k % 2))
            fast, reference = _both_paths(scorer, _job(request, as_of))
            assert fast is not None, "simulated records are canonical"
            if _assert_same_outcome(fast, reference):
                compared += 1
                exact += first_difference(fast.row, reference.row, tol=0.0) is None  # type: ignore[union-attr]
    assert compared >= 30
    # Not only within 1e-9: the same floating-point operations give the same bits.
    assert exact == compared


def test_requests_scored_together_see_only_their_own_records(
    trained_shop, records: HistoryRecords
) -> None:
    """Concurrent requests share one pass of the features: each row must be the row of its
    request alone, with the same posting twice, offers in common and pushes in only some."""
    aggregates = copy.copy(trained_shop.model.aggregates)
    aggregates.collecting_since_ = {}  # the shop's own start unknown: each request's counts
    scorer = ModelScorer(trained_shop.model, fast_path=True)
    rng = random.Random(11)
    by_offer: dict[str, list[dict[str, Any]]] = {}
    for posting in records.postings:
        for product in posting["products"]:
            by_offer.setdefault(product["offer_id"], []).append(posting)
    shared = [group for group in by_offer.values() if len(group) >= 3]
    assert shared, "the simulated shop sells some offer more than once"
    postings = rng.sample(shared[0], 3) + rng.sample(records.postings, 5)
    prepared = []
    for k, posting in enumerate(postings + postings[:2]):  # the first two postings twice
        ordered = parse_timestamp(posting["in_process_at"])
        assert ordered is not None
        as_of = ordered + (30 + 50 * k) * HOUR_NS
        request = build_score_request(records, posting, as_of)
        if k % 3 == 1:
            request["pushes"] = []  # this one shows no pushes: they are not collected for it
        if k >= len(postings):
            request["prices"] = request["prices"][: len(request["prices"]) // 2]
        try:
            ready = scorer.prepare_fast(_job(request, as_of), as_of, ())
        except RequestRejected:
            continue  # closed by then
        assert ready is not None
        prepared.append(replace(ready, aggregates=aggregates))
    assert len(prepared) >= 6
    alone = [replace(p) for p in prepared]
    for posting in alone:
        complete_rows([posting])
    complete_rows(prepared)
    for together, by_itself in zip(prepared, alone, strict=True):
        assert first_difference(together.row, by_itself.row, tol=0.0) is None
    without_pushes = [p.row for p in alone if math.isnan(p.row["delivery_date_changes"])]
    assert without_pushes and len(without_pushes) < len(alone)


def test_api_rows_equal_the_batch_on_the_whole_archive(
    trained_shop, records: HistoryRecords, scorer: ModelScorer
) -> None:
    """A seller's check: every open posting of the archive, sent as a request, gets the row the
    nightly batch builds from the whole archive at the same moment (not only from the request's
    own records). Untimed delivery-date pushes carry the time the archive gives them, and later
    date changes let the service recover the promise in force at as_of."""
    as_of = int(trained_shop.as_of.value) // 1000 * 1000 - 3 * HOUR_NS
    moment = pd.Timestamp(as_of, tz="UTC")
    batch = build_features(trained_shop.tables, moment, aggregates=trained_shop.model.aggregates)
    by_number = {str(p["posting_number"]): p for p in records.postings}
    compared = 0
    lane_rows: list[dict[str, Any]] = []
    for number in batch.index:
        request = build_score_request(records, by_number[str(number)], as_of)
        job = _job(request, as_of)
        try:
            prepared = scorer.prepare_fast(job, as_of, ())
            prepared = prepared or scorer.prepare_reference(job, as_of, ())
        except RequestRejected:
            # The export's snapshot of a posting that closed after as_of says "delivered" or
            # "cancelled" with no closing push known at as_of: no request at as_of looks like it.
            assert by_number[str(number)]["status"] in ("delivered", "cancelled")
            continue
        expected = {column: _plain_value(batch.loc[number, column]) for column in batch.columns}
        assert first_difference(prepared.row, expected) is None, number
        compared += 1
        if prepared.path == "fast":
            lane_rows.append(prepared.row)
    assert compared >= 100
    # Every family met values that say something through the request lane.
    numeric = [column for column in FEATURE_COLUMNS if column not in CATEGORICAL_COLUMNS]
    silent = [
        column
        for column in numeric
        if not any(
            row[column] not in (0.0, None) and row[column] == row[column] for row in lane_rows
        )
    ]
    assert len(lane_rows) >= 100 and not silent, (len(lane_rows), silent)


def _plain_value(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    return value if isinstance(value, str) else float(value)


# --- generated requests ----------------------------------------------------------------------

T0 = pd.Timestamp("2026-06-10T08:00:00Z")


def _stamp(hours: int, style: int) -> str:
    moment = T0 + pd.Timedelta(hours=hours)
    if style == 0:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 1:
        return moment.tz_convert("Europe/Moscow").isoformat()
    if style == 2:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


offers = st.sampled_from(["A", "B", "C", None])
currencies = st.sampled_from(["RUB", "CNY", "USD", "XYZ", None])
prices_ = st.sampled_from([0, 99.99, "100.50", "1390.000000", 120, "80"])


@st.composite
def generated_requests(draw: st.DrawFn, keys: dict[str, list[Any]]) -> tuple[dict, int]:
    """A request around an order at hour ``h``: dates mostly after it, events on a coarse grid."""
    number = "P-1"
    h = draw(st.integers(-40, 100))
    later = st.builds(_stamp, st.integers(h, h + 300), st.integers(0, 3))
    maybe_later = st.one_of(st.none(), later)
    carrier = st.sampled_from([*keys["carrier"], 777, "", None])
    customer = st.sampled_from([*keys["customer"], 1])
    products = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "offer_id": offers,
                    "sku": st.sampled_from([*keys["sku"], None, 5]),
                    "quantity": st.integers(1, 3),
                    "price": prices_,
                    "currency_code": currencies,
                }
            ),
            min_size=1,
            max_size=3,
        )
    )
    begin = draw(st.integers(h, h + 200))
    analytics = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "region": st.sampled_from([*keys["region"], "Nowhere", None]),
                    "payment_type_group_name": st.sampled_from(["Card", "COD", None]),
                    "delivery_type": st.sampled_from(["PVZ", "Courier", None]),
                    "is_premium": st.sampled_from([True, False, None]),
                    "tpl_provider_id": carrier,
                    "delivery_date_begin": st.sampled_from([None, _stamp(begin, 0)]),
                    "delivery_date_end": st.sampled_from([None, _stamp(begin + 48, 2)]),
                }
            ),
        )
    )
    posting = {
        "posting_number": number,
        "status": draw(
            st.sampled_from(["awaiting_packaging", "delivering", "delivering", "delivered", None])
        ),
        "in_process_at": _stamp(h, draw(st.integers(0, 3))),
        "shipment_date": draw(maybe_later),
        "delivering_date": draw(maybe_later),
        "delivery_method": draw(
            st.one_of(st.none(), st.fixed_dictionaries({"tpl_provider_id": carrier}))
        ),
        "customer": draw(st.one_of(st.none(), st.fixed_dictionaries({"customer_id": customer}))),
        "products": products,
        "analytics_data": analytics,
    }
    # A coarse grid makes ties at the same moment common.
    grid = st.builds(lambda k: _stamp(h + k * 12, 0), st.integers(-4, 20))
    price_rows = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "offer_id": st.sampled_from(["A", "B", "C"]),
                    "at": grid,
                    "price": prices_,
                    "old_price": st.sampled_from([None, 150, "130.5", ""]),
                    "currency_code": currencies,
                }
            ),
            max_size=8,
        )
    )
    target = st.sampled_from([number, number, "OTHER"])
    push = st.one_of(
        st.fixed_dictionaries(
            {
                "message_type": st.just("TYPE_NEW_POSTING"),
                "posting_number": target,
                "in_process_at": grid,
            }
        ),
        st.fixed_dictionaries(
            {
                "message_type": st.just("TYPE_STATE_CHANGED"),
                "posting_number": target,
                "new_state": st.sampled_from(
                    ["posting_in_carriage", "posting_in_carriage", "posting_delivered"]
                ),
                "changed_state_date": grid,
            }
        ),
        st.fixed_dictionaries(
            {
                "message_type": st.just("TYPE_POSTING_CANCELLED"),
                "posting_number": target,
                "changed_state_date": grid,
            }
        ),
        st.fixed_dictionaries(
            {
                "message_type": st.just("TYPE_DELIVERY_DATE_CHANGED"),
                "posting_number": target,
                "received_at": grid,
                "new_delivery_date_begin": maybe_later,
                "new_delivery_date_end": maybe_later,
                "old_delivery_date_begin": maybe_later,
                "old_delivery_date_end": maybe_later,
            }
        ),
        st.fixed_dictionaries(
            {
                "message_type": st.just("TYPE_CREATE_OR_UPDATE_ITEM"),
                "offer_id": offers,
                "product_id": st.sampled_from([7, 0]),
                "is_error": st.booleans(),
                "changed_at": grid,
            }
        ),
        st.fixed_dictionaries({"message_type": st.just("TYPE_CHAT_NEW_MESSAGE")}),
    )
    scans = st.fixed_dictionaries(
        {"posting_number": target, "at": grid, "status": st.sampled_from(["seen", ""])}
    )
    request = {
        "posting": posting,
        "prices": price_rows,
        "pushes": draw(st.lists(push, max_size=6)),
        "tracking": draw(st.lists(scans, max_size=4)),
    }
    as_of = (T0 + pd.Timedelta(hours=h + draw(st.integers(-5, 300)))).value
    return request, as_of


def _keys(model: Any) -> dict[str, list[Any]]:
    counts = model.aggregates.rate_counts_
    return {
        "sku": [int(k) for k in counts["sku"]["key"].dropna().unique()[:3]],
        "region": [str(k) for k in counts["region"]["key"].dropna().unique()[:3]],
        "carrier": [int(k) for k in counts["carrier"]["key"].dropna().unique()[:3]],
        "customer": [int(k) for k in model.aggregates.customer_postings_["key"].unique()[:3]],
    }


def test_fast_rows_equal_build_features_on_generated_requests(trained_shop) -> None:
    scorer = ModelScorer(trained_shop.model, fast_path=True)
    computed = []

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(generated_requests(_keys(trained_shop.model)))
    def check(case: tuple[dict, int]) -> None:
        request, as_of = case
        fast, reference = _both_paths(scorer, _job(request, as_of))
        computed.append(_assert_same_outcome(fast, reference))

    check()
    assert sum(computed) >= 20, "too few generated requests reached the feature comparison"


# --- value parsers ---------------------------------------------------------------------------
# A short column is read by the canonical readers themselves: the vectorised parsers that read
# every long column (and any value the readers refuse) must give the same values.


@contextmanager
def _vectorised():
    with mock.patch.object(ingest_values, "SHORT_COLUMN", -1):
        yield


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.datetimes(
        min_value=pd.Timestamp("1950-01-01").to_pydatetime(),
        max_value=pd.Timestamp("2150-01-01").to_pydatetime(),
    ),
    st.integers(0, 999_999_999),
    st.sampled_from(["Z", "+03:00", "-05:30", "", "+00:00"]),
    st.integers(0, 9),
)
def test_timestamp_parser_agrees_with_ingestion(moment, nanos, offset, digits) -> None:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{nanos:09d}"[:digits]
    text += offset
    with _vectorised():
        expected, bad = build_utc_timestamps([text])
    assert not bad[0]
    assert parse_timestamp(text) == expected.iloc[0].value
    assert build_utc_timestamps([text])[0].equals(expected)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.one_of(
        st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False).map(str),
        st.floats(min_value=-1e6, max_value=1e12, allow_nan=False),
        st.integers(-(10**12), 10**12),
        st.from_regex(r"-?[0-9]{1,15}(\.[0-9]{1,12})?", fullmatch=True),
    )
)
def test_decimal_parser_agrees_with_ingestion(value) -> None:
    with _vectorised():
        expected, bad = build_decimals([value])
    assert not bad[0]
    assert parse_decimal(value) == expected.iloc[0]
    assert build_decimals([value])[0].equals(expected)


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.one_of(st.none(), st.just(""), st.integers(-(2**63), 2**63 - 1)), max_size=5))
@example(["", -(2**63)])  # the smallest int64 beside a blank: once refused by the vectorised path
def test_integer_parser_agrees_with_ingestion(values) -> None:
    with _vectorised():
        expected, bad = build_integers(values)
    assert not bad.any()
    assert [parse_integer(v) for v in values] == [None if pd.isna(v) else v for v in expected]
    assert build_integers(values)[0].equals(expected)


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.one_of(
        st.text(max_size=12),
        st.integers(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.none(),
    )
)
def test_text_parser_agrees_with_ingestion(value) -> None:
    with _vectorised():
        column = build_strings([value])
    expected = column.iloc[0]
    assert parse_text(value) == (None if pd.isna(expected) else expected)
    assert build_strings([value]).equals(column)


# --- probabilities: API, batch path, training path ---------------------------------------------


def test_api_probability_equals_batch_and_training_paths(
    client: TestClient, records: HistoryRecords, trained_shop
) -> None:
    model = trained_shop.model
    as_of = int(trained_shop.as_of.value) // 1000 * 1000
    requests = open_score_requests(records, as_of, limit=12)
    assert len(requests) == 12
    batch = client.post("/v1/score/batch", json={"items": requests})
    assert batch.status_code == 200
    batch_results = batch.json()["results"]
    moment = pd.Timestamp(as_of, tz="UTC")
    for request, from_batch in zip(requests, batch_results, strict=True):
        response = client.post("/v1/score", json=request)
        assert response.status_code == 200, response.text
        api = response.json()["probability"]
        tables = tables_from_objects(
            [request["posting"]],
            pushes=request["pushes"],
            prices=request["prices"],
            tracking=request["tracking"],
        )
        batch_path = model.score_tables(tables, moment)
        assert batch_path["posting_number"].tolist() == [request["posting"]["posting_number"]]
        moments = pd.DataFrame(
            {"posting_number": [request["posting"]["posting_number"]], "as_of": [moment]}
        )
        training_path = model.score_features(
            build_feature_rows(tables, moments, aggregates=model.aggregates)
        )
        assert math.isclose(api, float(batch_path["probability"].iloc[0]), abs_tol=1e-9)
        assert math.isclose(api, float(training_path[0]), abs_tol=1e-9)
        assert from_batch["score"]["probability"] == api
        assert from_batch["score"]["reasons"] == response.json()["reasons"]
        features = build_feature_rows(tables, moments, aggregates=model.aggregates)
        (explanation,) = build_explanations(model, features, training_path)
        assert response.json()["decision"] == explanation.decision
        assert response.json()["actions"] == list(explanation.actions)
        assert [r["code"] for r in response.json()["reasons"]] == [
            r.code for r in explanation.reasons
        ]


def test_matrix_probabilities_and_explanations_equal_the_frame_based_functions(
    records: HistoryRecords, scorer: ModelScorer, trained_shop
) -> None:
    model = trained_shop.model
    prepared = []
    for days_back in (0, 5, 10):
        as_of = int(trained_shop.as_of.value) - days_back * 24 * HOUR_NS
        for request in open_score_requests(records, as_of, limit=80):
            ready = scorer.prepare_fast(_job(request, as_of), as_of, ())
            assert ready is not None
            prepared.append(ready)
    rows = [p.row for p in prepared]
    frame = build_feature_frame(rows, [p.posting_number for p in prepared])
    matrix = model.build_matrix_from_rows(rows)
    assert np.array_equal(matrix, model.build_matrix(frame), equal_nan=True)
    probabilities = model.score_features(frame)
    for lang in LANGUAGES:
        served = scorer.score([replace(p, lang=lang) for p in prepared])
        assert np.array_equal([s.probability for s in served], probabilities)
        fast = [s.explanation for s in served]
        assert fast == build_explanations(model, frame, probabilities, lang=lang)
    # The rows cover every cause the model names, so every rule was compared.
    named = {reason.code for e in fast for reason in e.reasons}
    assert len(named) >= 4, named


# --- the load-time self-check ------------------------------------------------------------------


def test_probe_requests_pass_the_fast_path_check(trained_shop) -> None:
    scorer = ModelScorer(trained_shop.model, fast_path=True)
    jobs, as_of = build_probe_jobs(trained_shop.model)
    scorer.check_fast_path(jobs, as_of)
    assert scorer.path == "fast", scorer.fast_path_note


def test_a_model_whose_routes_differ_is_refused(trained_shop, monkeypatch) -> None:
    original = scoring.requests_history

    def drifted(requests):
        history, numbers = original(requests)
        history.postings["ordered_at"][:] += 3_600_000_000  # 1 ms: beyond 1e-9 of the hours
        return history, numbers

    monkeypatch.setattr(scoring, "requests_history", drifted)
    scorer = ModelScorer(trained_shop.model, fast_path=True)
    jobs, as_of = build_probe_jobs(trained_shop.model)
    with pytest.raises(RoutesDisagree, match="features differ"):
        scorer.check_fast_path(jobs, as_of)


def test_a_model_whose_explanations_differ_is_refused(trained_shop, monkeypatch) -> None:
    original = ModelScorer.explain

    def drifted(self, *args, **kwargs):
        explanations = original(self, *args, **kwargs)
        return [replace(e, expected_saving=e.expected_saving + 1.0) for e in explanations]

    monkeypatch.setattr(ModelScorer, "explain", drifted)
    scorer = ModelScorer(trained_shop.model, fast_path=True)
    jobs, as_of = build_probe_jobs(trained_shop.model)
    with pytest.raises(RoutesDisagree, match="explanations"):
        scorer.check_fast_path(jobs, as_of)
