"""Routes of the REST service: every status code, the request and response contract, security.

Each error path is a request a real client can send: no key (401), a scoring key on the admin
route (403), a body over the limit (413), bad JSON, wrong types and impossible values (422 with
the field's path), no model (503). Logs of all of it never show a key or the buyer's data.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hostile import DELETE, with_value
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cancel_risk.examples import load_history_records, open_score_requests
from core.features import FEATURE_VERSION
from core.model import RISK_LEVELS
from core.playbook import DECISIONS, LANGUAGES
from serving import schemas
from serving.app import create_app
from serving.scoring import MicroBatcher
from serving.settings import ServiceSettings, SettingsError
from serving.validation import reject_error

KEY = "scoring-key-0123456789"
ADMIN = "admin-key-9876543210"
BUYER_NAME = "Покупатель Секретов"
BUYER_PHONE = "+79991234567"


def _settings(model_uri: str, cache: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "model_uri": model_uri,
        "api_keys": (KEY, "second-key"),
        "admin_key": ADMIN,
        "model_cache_dir": cache,
    }
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def client(trained_model_dir: Path, cache_dir: Path) -> Iterator[TestClient]:
    app = create_app(_settings(str(trained_model_dir), cache_dir))
    with TestClient(app, headers={"X-API-Key": KEY}) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def requests_(trained_shop) -> list[dict[str, Any]]:
    records = load_history_records(trained_shop.history_dir)
    as_of = int(trained_shop.as_of.value) // 1000 * 1000
    found = open_score_requests(records, as_of, limit=6, latest_per_kind=20)
    assert len(found) == 6
    for request in found:
        request["posting"]["customer"] = {
            "customer_id": (request["posting"].get("customer") or {}).get("customer_id"),
            "name": BUYER_NAME,
            "phone": BUYER_PHONE,
            "address": {"city": "Москва", "street": "ул. Тайная, 1"},
        }
    return found


@pytest.fixture
def body(requests_: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(requests_[0])


# --- 200 ---------------------------------------------------------------------------------------


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["source"] == "local_path"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'cancel_risk_model_info{alias=""' in metrics.text
    assert 'cancel_risk_http_requests_total{method="GET",route="/readyz",status="200"}' in (
        metrics.text
    )


def test_score_returns_probability_level_reasons_and_decision(
    client: TestClient, body: dict[str, Any]
) -> None:
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    scored = response.json()
    assert scored["posting_number"] == body["posting"]["posting_number"]
    assert 0.0 <= scored["probability"] <= 1.0
    assert scored["risk_level"] in RISK_LEVELS
    assert scored["decision"] in DECISIONS
    assert len(scored["reasons"]) <= 3
    for reason in scored["reasons"]:
        assert reason["risk_drop"] > 0 and reason["facts"]
    assert scored["model"]["feature_version"] == FEATURE_VERSION
    assert scored["as_of"].startswith(body["as_of"][:19])
    metrics = client.get("/metrics").text
    assert 'cancel_risk_scores_total{path="fast"' in metrics


def test_model_info(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["source"] == "local_path"
    assert info["feature_version"] == FEATURE_VERSION
    assert info["scoring_path"] == "fast", info["fast_path_note"]


def test_languages_and_unknown_categories(client: TestClient, body: dict[str, Any]) -> None:
    texts = {}
    for lang in LANGUAGES:
        response = client.post("/v1/score", json={**body, "lang": lang})
        assert response.status_code == 200
        texts[lang] = response.json()["actions"] + [r["facts"] for r in response.json()["reasons"]]
    assert texts["en"] != texts["zh"] and texts["en"] != texts["ru"]
    unknown = copy.deepcopy(body)
    unknown["posting"]["analytics_data"]["region"] = "Марс"
    unknown["posting"]["delivery_method"]["tpl_provider_id"] = 99999
    for product in unknown["posting"]["products"]:
        product["currency_code"] = "XTS"
    assert client.post("/v1/score", json=unknown).status_code == 200


def test_non_canonical_values_take_the_reference_path_to_the_same_score(
    client: TestClient, body: dict[str, Any]
) -> None:
    canonical = client.post("/v1/score", json=body).json()
    spelled = copy.deepcopy(body)
    for product in spelled["posting"]["products"]:
        product["price"] = str(float(product["price"])).replace(".", ",")
    response = client.post("/v1/score", json=spelled)
    assert response.status_code == 200
    assert response.json()["probability"] == canonical["probability"]
    assert 'path="reference"' in client.get("/metrics").text


def test_batch_scores_each_posting_like_the_single_route(
    client: TestClient, requests_: list[dict[str, Any]]
) -> None:
    items: list[Any] = copy.deepcopy(requests_[:3])
    bad_price = copy.deepcopy(requests_[3])
    bad_price["posting"]["products"][0]["price"] = "-5"
    items += [bad_price, {"posting": "not an object"}, copy.deepcopy(requests_[4])]
    response = client.post("/v1/score/batch", json={"items": items})
    assert response.status_code == 200, response.text
    batch = response.json()
    assert [r["index"] for r in batch["results"]] == list(range(6))
    assert [r["status"] for r in batch["results"]] == ["scored"] * 3 + ["rejected"] * 2 + ["scored"]
    assert (batch["scored"], batch["rejected"]) == (4, 2)
    assert batch["results"][3]["errors"][0]["loc"] == [
        "body", "items", 3, "posting", "products", 0, "price",
    ]  # fmt: skip
    assert batch["results"][4]["errors"][0]["loc"] == ["body", "items", 4, "posting"]
    for i in (0, 1, 2, 5):
        single = client.post("/v1/score", json=items[i]).json()
        assert batch["results"][i]["score"] == single


# --- 401 / 403 ---------------------------------------------------------------------------------


def test_no_key_or_an_unknown_key_is_401(client: TestClient, body: dict[str, Any]) -> None:
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}):
        response = client.post("/v1/score", json=body, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "X-API-Key"
    bare = TestClient(client.app)
    assert bare.post("/v1/score", json=body).status_code == 401
    assert bare.get("/v1/model").status_code == 401
    assert bare.post("/v1/score/batch", json={"items": []}).status_code == 401


def test_a_scoring_key_on_the_admin_route_is_403(client: TestClient) -> None:
    assert client.post("/v1/model/reload").status_code == 403
    assert client.post("/v1/model/reload", headers={"X-API-Key": "second-key"}).status_code == 403


def test_the_admin_key_also_scores(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/v1/score", json=body, headers={"X-API-Key": ADMIN}).status_code == 200


# --- 413 ---------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413(
    trained_model_dir: Path, cache_dir: Path, body: dict[str, Any]
) -> None:
    app = create_app(_settings(str(trained_model_dir), cache_dir, max_body_bytes=8192))
    minimal = {"posting": body["posting"], "as_of": body["as_of"]}
    with TestClient(app, headers={"X-API-Key": KEY}) as small:
        large = copy.deepcopy(minimal)
        large["posting"]["padding"] = "x" * 20_000
        response = small.post("/v1/score", json=large)
        assert response.status_code == 413
        assert "8192" in response.json()["detail"]

        def chunks() -> Iterator[bytes]:
            payload = json.dumps(large).encode()
            for start in range(0, len(payload), 1000):
                yield payload[start : start + 1000]

        chunked = small.post(
            "/v1/score", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
        assert small.post("/v1/score", json=minimal).status_code == 200


# --- 422 ---------------------------------------------------------------------------------------


CASES_422 = [
    (("posting",), DELETE, ["body", "posting"], "Field required"),
    (("posting",), [1, 2], ["body", "posting"], "valid dictionary"),
    (("prices",), {"a": 1}, ["body", "prices"], "valid list"),
    (("price",), [], ["body", "price"], "Extra inputs"),
    (("lang",), "de", ["body", "lang"], "'en', 'zh' or 'ru'"),
    (("as_of",), "yesterday", ["body", "as_of"], "datetime"),
    (("as_of",), "1990-01-01T00:00:00Z", ["body", "as_of"], "between 2000 and 2200"),
    (("as_of",), "2199-01-01T00:00:00Z", ["body", "as_of"], "in the future"),
    (("as_of",), "0001-01-01T00:00:00+01:00", ["body", "as_of"], "between 2000 and 2200"),
    (("as_of",), "9999-12-31T23:59:59-01:00", ["body", "as_of"], "between 2000 and 2200"),
    (("posting", "posting_number"), DELETE, ["body", "posting", "posting_number"], "no posting"),
    (("posting", "in_process_at"), "31/02/2026", ["body", "posting", "in_process_at"], "not a"),
    (("posting", "products"), [], ["body", "posting", "products"], "no products"),
    (("posting", "products", 0, "price"), "-5", ["body", "posting", "products", 0, "price"],
     "negative"),
    (("posting", "products", 0, "price"), "NaN", ["body", "posting", "products", 0, "price"],
     "not a number"),
    (("posting", "products", 0, "price"), "1e309", ["body", "posting", "products", 0, "price"],
     "not finite"),
    (("posting", "products", 0, "price"), "abc", ["body", "posting", "products", 0, "price"],
     "not a number"),
    (("posting", "products", 0, "quantity"), 0,
     ["body", "posting", "products", 0, "quantity"], "positive integer"),
    (("posting", "products", 0), "x", ["body", "posting", "products", 0], "not an object"),
    (("posting", "delivering_date"), "2000-01-02T00:00:00Z",
     ["body", "posting", "delivering_date"], "before it was ordered"),
    (("posting", "in_process_at"), "1999-06-01T00:00:00Z", ["body", "posting", "in_process_at"],
     "before 2000"),
    (("posting", "status"), "delivered", ["body", "posting", "status"], "only open postings"),
    (("prices",), [{"offer_id": "A", "at": "2026-06-01T00:00:00Z", "price": -3}],
     ["body", "prices", 0, "price"], "negative"),
    (("prices",), [{"at": "2026-06-01T00:00:00Z", "price": 3}],
     ["body", "prices", 0, "offer_id"], "no offer_id"),
    (("pushes",), [{"posting_number": "x"}], ["body", "pushes", 0, "message_type"],
     "no message_type"),
    (("pushes",), [{"message_type": "TYPE_STATE_CHANGED", "posting_number": "x",
                    "changed_state_date": "2026-06-01T00:00:00Z"}],
     ["body", "pushes", 0, "new_state"], "no new_state"),
    (("tracking",), [{"posting_number": "x", "status": "seen"}], ["body", "tracking", 0, "at"],
     "no at"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "loc", "message"), CASES_422)
def test_unusable_requests_are_422_with_the_field_path(
    client: TestClient, body: dict[str, Any], path: tuple, value: Any, loc: list, message: str
) -> None:
    response = client.post("/v1/score", json=with_value(body, path, value))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == loc
    assert message in detail[0]["msg"]


def test_malformed_json_is_422(client: TestClient) -> None:
    for payload in (
        b"{not json",
        b'{"posting": {"a": "\\ud800"}}',
        b'{"posting": {"in_process_at": NaN}}',
        b'{"posting": {"price": 1e400}}',
        b"[" * 5000,
        b"",
    ):
        response = client.post(
            "/v1/score", content=payload, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.json()["detail"][0]["msg"]


def test_too_many_batch_items_is_422(
    trained_model_dir: Path, cache_dir: Path, body: dict[str, Any]
) -> None:
    app = create_app(_settings(str(trained_model_dir), cache_dir, max_batch_postings=2))
    with TestClient(app, headers={"X-API-Key": KEY}) as limited:
        response = limited.post("/v1/score/batch", json={"items": [body] * 3})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "items"]


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=st.sampled_from(
        [
            ("posting", "in_process_at"),
            ("posting", "shipment_date"),
            ("posting", "status"),
            ("posting", "products", 0, "price"),
            ("posting", "products", 0, "quantity"),
            ("posting", "products", 0, "sku"),
            ("posting", "analytics_data"),
            ("posting", "delivery_method", "tpl_provider_id"),
            ("posting", "customer"),
        ]
    ),
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=5,
    ),
)
def test_any_value_in_any_field_is_scored_or_refused_never_a_500(
    client: TestClient, body: dict[str, Any], field: tuple, value: Any
) -> None:
    response = client.post("/v1/score", json=with_value(body, field, value))
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["detail"][0]["msg"]


# --- 503 ---------------------------------------------------------------------------------------


def test_no_model_is_503(tmp_path: Path, body: dict[str, Any]) -> None:
    app = create_app(_settings(str(tmp_path / "no-such-model"), tmp_path / "cache"))
    with TestClient(app, headers={"X-API-Key": KEY}) as empty:
        assert empty.get("/healthz").status_code == 200
        assert empty.get("/readyz").status_code == 503
        assert empty.get("/v1/model").status_code == 503
        response = empty.post("/v1/score", json=body)
        assert response.status_code == 503
        assert "no model is loaded" in response.json()["detail"]
        assert empty.post("/v1/score/batch", json={"items": [body]}).status_code == 503


# --- security and configuration ----------------------------------------------------------------


def test_logs_never_show_keys_or_buyer_data(
    client: TestClient, body: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    caplog.set_level(logging.DEBUG)
    client.post("/v1/score", json=body)
    client.post("/v1/score", json=body, headers={"X-API-Key": "wrong-" + KEY})
    client.post(
        "/v1/score", json=with_value(body, ("posting", "products", 0, "price"), BUYER_PHONE)
    )
    client.post("/v1/score/batch", json={"items": [body, {"posting": BUYER_NAME}]})
    client.post("/v1/model/reload")
    # An unexpected failure whose message quotes the buyer is logged by type and place only.
    scorer = client.app.state.service.store.current.scorer
    monkeypatch.setattr(
        scorer, "score", lambda prepared: (_ for _ in ()).throw(ValueError(BUYER_PHONE))
    )
    failed = client.post("/v1/score", json=body)
    assert failed.status_code == 500 and failed.json() == {"detail": "internal error"}
    assert "unexpected ValueError" in caplog.text
    for secret in (KEY, ADMIN, BUYER_NAME, BUYER_PHONE, "ул. Тайная"):
        assert secret not in caplog.text


def test_cors_is_off_unless_configured(
    client: TestClient, trained_model_dir: Path, cache_dir: Path
) -> None:
    preflight = {
        "Origin": "https://shop.example",
        "Access-Control-Request-Method": "POST",
    }
    response = client.options("/v1/score", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    app = create_app(
        _settings(str(trained_model_dir), cache_dir, cors_origins=("https://shop.example",))
    )
    with TestClient(app) as allowed:
        response = allowed.options("/v1/score", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://shop.example"


def test_settings_come_from_the_environment() -> None:
    settings = ServiceSettings.from_env(
        {
            "CANCEL_RISK_API_KEYS": " a , b ,,",
            "CANCEL_RISK_ADMIN_KEY": "admin-secret-zz",
            "CANCEL_RISK_PORT": "9001",
            "CANCEL_RISK_CORS_ORIGINS": "https://x.example",
            "CANCEL_RISK_FAST_PATH": "false",
        },
        model_uri="models:/m@champion",
    )
    assert [k.get_secret_value() for k in settings.api_keys] == ["a", "b"]
    assert settings.host == "127.0.0.1" and settings.port == 9001
    assert settings.fast_path is False and settings.cors_origins == ("https://x.example",)
    assert "admin-secret-zz" not in repr(settings)
    assert "admin-secret-zz" not in str(settings.model_dump())
    with pytest.raises(SettingsError, match="CANCEL_RISK_PORT"):
        ServiceSettings.from_env({"CANCEL_RISK_PORT": "eighty"})


def test_the_openapi_document_describes_every_route(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    schemas_ = document["components"]["schemas"]
    assert "posting" in schemas_["ScoreRequest"]["properties"]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert "200" in operation["responses"], (method, path)
    assert document["paths"]["/v1/score"]["post"]["security"] == [{"APIKeyHeader": []}]


def test_schema_enums_match_the_training_contract() -> None:
    assert schemas.Lang.__args__ == LANGUAGES
    assert schemas.RiskLevel.__args__ == RISK_LEVELS
    assert schemas.Decision.__args__ == DECISIONS


# --- scoring concurrent requests together --------------------------------------------------------


def test_concurrent_requests_share_one_scoring_call_in_order() -> None:
    calls: list[list[int]] = []

    def process(jobs: list[int]) -> list[int | BaseException]:
        calls.append(jobs)
        return [ValueError("odd") if job % 2 else job * 10 for job in jobs]

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_batch=3)

    async def main() -> list[int | BaseException]:
        return await asyncio.gather(*(batcher.submit(j) for j in range(5)), return_exceptions=True)

    results = asyncio.run(main())
    assert calls == [[0, 1, 2], [3, 4]]
    assert results[0] == 0 and results[2] == 20 and results[4] == 40
    assert isinstance(results[1], ValueError) and isinstance(results[3], ValueError)


def test_a_posting_that_fails_inside_the_model_fails_alone(
    client: TestClient, requests_: list[dict[str, Any]], monkeypatch
) -> None:
    scorer = client.app.state.service.store.current.scorer
    failing = requests_[1]["posting"]["posting_number"]
    original = scorer.score

    def fails_on_one(prepared):
        if any(p.posting_number == failing for p in prepared):
            raise ValueError("cannot score")
        return original(prepared)

    monkeypatch.setattr(scorer, "score", fails_on_one)
    batch = client.post("/v1/score/batch", json={"items": requests_[:3]}).json()
    assert [r["status"] for r in batch["results"]] == ["scored", "rejected", "scored"]
    assert batch["results"][1]["errors"][0]["type"] == "internal_error"
    assert client.post("/v1/score", json=requests_[0]).status_code == 200
    assert client.post("/v1/score", json=requests_[1]).status_code == 500


@pytest.mark.parametrize(
    ("reason", "loc"),
    [
        ("no posting_number", ["body", "posting", "posting_number"]),
        ("created_at 'x' is not a timestamp", ["body", "posting", "created_at"]),
        ("product 3 has no quantity", ["body", "posting", "products", 2, "quantity"]),
        ("price '1e999' of product 2 is not finite", ["body", "posting", "products", 1, "price"]),
        ("product 1 is not an object", ["body", "posting", "products", 0]),
        ("push: no message_type", ["body", "pushes", 4, "message_type"]),
        (
            "TYPE_DELIVERY_DATE_CHANGED push: no received_at, and no later timestamped push",
            ["body", "pushes", 4, "received_at"],
        ),
        ("TYPE_CREATE_OR_UPDATE_ITEM push: neither offer_id nor product_id",
         ["body", "pushes", 4, "offer_id"]),
        ("price row: old_price 'x' is not a number", ["body", "prices", 4, "old_price"]),
        ("scan row: not an object", ["body", "tracking", 4]),
    ],
)  # fmt: skip
def test_ingestion_reasons_become_field_paths(reason: str, loc: list) -> None:
    error = reject_error(reason, 5, ("body",))
    assert list(error.loc) == loc
    assert error.msg == reason


def test_an_undated_delivery_date_push_is_dated_by_the_next_push_or_refused(
    client: TestClient, body: dict[str, Any]
) -> None:
    number = body["posting"]["posting_number"]
    undated = {
        "message_type": "TYPE_DELIVERY_DATE_CHANGED",
        "posting_number": number,
        "new_delivery_date_end": body["as_of"],
    }
    alone = client.post("/v1/score", json={**body, "pushes": [undated]})
    assert alone.status_code == 422
    assert alone.json()["detail"][0]["loc"] == ["body", "pushes", 0, "received_at"]
    later = {
        "message_type": "TYPE_STATE_CHANGED",
        "posting_number": number,
        "new_state": "posting_in_carriage",
        "changed_state_date": body["posting"]["in_process_at"],
    }
    dated = client.post("/v1/score", json={**body, "pushes": [undated, later]})
    assert dated.status_code == 200, dated.text
