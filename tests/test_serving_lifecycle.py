"""Model lifecycle against a real MLflow registry: load by alias, reload, refuse, cache, poll.

Five versions are registered once: v1 and v3 are good, v2 has a feature version this code does
not build, v4 is broken (its booster file was cut short in the artifact store), and v5 is a
pyfunc model that is not a cancel-risk model. The tests move the ``champion`` alias and check
that the service serves the champion, keeps serving the old model while a reload runs and after
a reload is refused, picks up a good new champion by reload or by polling, and starts from its
local cache when the tracking server is unreachable or the champion is refused.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from cancel_risk.examples import load_history_records, open_score_requests
from serving import model_loading
from serving.app import create_app
from serving.settings import ServiceSettings
from training.registry import log_risk_model

KEY = "lifecycle-key"
ADMIN = "lifecycle-admin"
NAME = "cancel-risk"


@dataclasses.dataclass(frozen=True)
class Registry:
    uri: str
    client: MlflowClient

    def point_champion_at(self, version: str) -> None:
        self.client.set_registered_model_alias(NAME, "champion", version)


# A pyfunc model that loads and predicts, but is not a cancel-risk model.
FOREIGN_MODEL_CODE = """
import mlflow.pyfunc
from mlflow.models import set_model


class EchoModel(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str]) -> list[str]:
        return model_input


set_model(EchoModel())
"""


def _cut_short(artifacts: Path) -> None:
    """Break a logged model the way an interrupted upload would: its booster file is cut."""
    boosters = list(artifacts.rglob("booster.txt"))
    assert len(boosters) == 1, boosters
    text = boosters[0].read_bytes()
    boosters[0].write_bytes(text[: len(text) // 3])


@pytest.fixture(scope="module")
def registry(
    trained_shop, empty_tracking_db: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("registry")
    shutil.copyfile(empty_tracking_db, directory / "mlflow.db")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    incompatible = dataclasses.replace(trained_shop.model, feature_version="999")
    foreign_code = directory / "foreign_model.py"
    foreign_code.write_text(FOREIGN_MODEL_CODE, encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)  # a SQLite store keeps artifacts under ./mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        logged = []
        for model in (trained_shop.model, incompatible, trained_shop.model, trained_shop.model):
            with mlflow.start_run():
                logged.append(log_risk_model(model, input_example=None, registered_model_name=NAME))
        _cut_short(Path(logged[3].artifact_path.removeprefix("file://")))
        with mlflow.start_run():
            mlflow.pyfunc.log_model(
                name="model", python_model=str(foreign_code), registered_model_name=NAME
            )
        yield Registry(uri, MlflowClient(uri))
        mlflow.set_tracking_uri(None)


@pytest.fixture
def tracking(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    mlflow.set_tracking_uri(registry.uri)
    registry.point_champion_at("1")
    return registry


@pytest.fixture(scope="module")
def request_body(trained_shop) -> dict[str, Any]:
    records = load_history_records(trained_shop.history_dir)
    as_of = int(trained_shop.as_of.value) // 1000 * 1000
    return open_score_requests(records, as_of, limit=1, latest_per_kind=10)[0]


def _settings(cache: Path, **overrides: Any) -> ServiceSettings:
    values: dict[str, Any] = {
        "model_uri": f"models:/{NAME}@champion",
        "api_keys": (KEY,),
        "admin_key": ADMIN,
        "model_cache_dir": cache,
    }
    values.update(overrides)
    return ServiceSettings(**values)


def _served_version(client: TestClient, body: dict[str, Any]) -> str:
    response = client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    return response.json()["model"]["version"]


def _reload(client: TestClient):
    return client.post("/v1/model/reload", headers={"X-API-Key": ADMIN})


def test_the_champion_is_served_by_alias_and_cached(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any]
) -> None:
    with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
        info = client.get("/v1/model").json()
        assert (info["version"], info["alias"], info["source"]) == ("1", "champion", "registry")
        assert info["run_id"] and info["registry_error"] is None
        assert _served_version(client, request_body) == "1"
    assert (tmp_path / NAME / "current.json").is_file()


def test_a_refused_reload_keeps_the_old_model_serving_during_and_after(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any], monkeypatch
) -> None:
    loading = threading.Event()
    release = threading.Event()
    real_load = model_loading.load_risk_model_from_mlflow

    def slow_load(uri: str):
        loading.set()
        assert release.wait(60)
        return real_load(uri)

    app = create_app(_settings(tmp_path))
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        assert _served_version(client, request_body) == "1"
        tracking.point_champion_at("2")
        monkeypatch.setattr(app.state.service.store, "_load_from_uri", slow_load)
        outcome: dict[str, Any] = {}
        reloader = threading.Thread(target=lambda: outcome.update(response=_reload(client)))
        reloader.start()
        try:
            assert loading.wait(30), "the reload never started loading"
            # While v2 is being loaded, v1 keeps answering.
            for _ in range(5):
                assert _served_version(client, request_body) == "1"
        finally:
            release.set()
            reloader.join(60)
        refused = outcome["response"]
        assert refused.status_code == 409
        assert refused.json()["status"] == "refused"
        assert "feature version" in refused.json()["message"]
        assert refused.json()["model"]["version"] == "1"
        assert _served_version(client, request_body) == "1"
        assert client.get("/v1/model").json()["version"] == "1"
        assert 'cancel_risk_model_reloads_total{outcome="refused"} 1.0' in (
            client.get("/metrics").text
        )


def test_a_good_new_champion_is_loaded_by_reload(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any]
) -> None:
    with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
        tracking.point_champion_at("3")
        loaded = _reload(client)
        assert loaded.status_code == 200
        assert (loaded.json()["status"], loaded.json()["previous_version"]) == ("loaded", "1")
        assert _served_version(client, request_body) == "3"
        again = _reload(client)
        assert (again.status_code, again.json()["status"]) == (200, "unchanged")


def test_polling_picks_up_a_new_champion(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any]
) -> None:
    app = create_app(_settings(tmp_path, model_poll_seconds=0.2))
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        assert _served_version(client, request_body) == "1"
        tracking.point_champion_at("3")
        deadline = time.monotonic() + 30
        while client.get("/v1/model").json()["version"] != "3":
            assert time.monotonic() < deadline, "polling did not pick up version 3"
            time.sleep(0.2)
        assert _served_version(client, request_body) == "3"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_tracking_server_at_startup_serves_the_cache(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any], monkeypatch
) -> None:
    with TestClient(create_app(_settings(tmp_path))):
        pass  # caches version 1
    down = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri(down)
    with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
        info = client.get("/v1/model").json()
        assert (info["source"], info["version"]) == ("local_cache", "1")
        assert "unreachable" in info["registry_error"]
        assert client.get("/readyz").json()["source"] == "local_cache"
        assert _served_version(client, request_body) == "1"
        # Still down when a reload is asked: 503, and the cached model keeps serving.
        reload = _reload(client)
        assert (reload.status_code, reload.json()["status"]) == (503, "unreachable")
        assert _served_version(client, request_body) == "1"


REFUSED_CHAMPIONS = [
    ("2", "incompatible model: model at"),
    ("4", "booster.txt is broken: it crashed LightGBM's reader"),
    ("5", "is not a cancel-risk model"),
]


@pytest.mark.parametrize(("version", "message"), REFUSED_CHAMPIONS)
def test_a_broken_or_incompatible_champion_is_refused_on_reload_and_scoring_continues(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any], version: str, message: str
) -> None:
    with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
        assert _served_version(client, request_body) == "1"
        tracking.point_champion_at(version)
        refused = _reload(client)
        assert refused.status_code == 409
        outcome = refused.json()
        assert outcome["status"] == "refused"
        assert message in outcome["message"]
        assert outcome["message"].endswith("; still serving version 1")
        assert (outcome["previous_version"], outcome["model"]["version"]) == ("1", "1")
        assert client.get("/readyz").status_code == 200
        assert _served_version(client, request_body) == "1"
        info = client.get("/v1/model").json()
        assert (info["version"], info["source"]) == ("1", "registry")


@pytest.mark.parametrize(("version", "message"), REFUSED_CHAMPIONS)
def test_a_refused_champion_at_startup_serves_the_cache(
    tracking: Registry, tmp_path: Path, request_body: dict[str, Any], version: str, message: str
) -> None:
    with TestClient(create_app(_settings(tmp_path))):
        pass  # caches version 1
    tracking.point_champion_at(version)
    with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
        info = client.get("/v1/model").json()
        assert (info["source"], info["version"]) == ("local_cache", "1")
        assert message in info["registry_error"]
        assert _served_version(client, request_body) == "1"


def test_a_saved_model_with_a_broken_booster_is_refused_and_the_service_stays_up(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    """LightGBM crashes the process that parses a booster file cut short: it is parsed aside."""
    broken = Path(shutil.copytree(trained_model_dir, tmp_path / "broken"))
    _cut_short(broken)
    settings = _settings(tmp_path / "cache", model_uri=str(broken))
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        detail = client.get("/v1/model").json()["detail"]
        assert "booster.txt is broken: it crashed LightGBM's reader" in detail


def test_no_registry_and_no_cache_means_no_model(tmp_path: Path, monkeypatch) -> None:
    down = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", down)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(down)
    try:
        with TestClient(create_app(_settings(tmp_path)), headers={"X-API-Key": KEY}) as client:
            assert client.get("/readyz").status_code == 503
            assert "unreachable" in client.get("/v1/model").json()["detail"]
    finally:
        mlflow.set_tracking_uri(None)
