"""The live mode end to end: a real ``cancel-risk serve --live`` (uvicorn, its worker process,
a SQLite or PostgreSQL book), fed by ``cancel-risk replay`` as Ozon and the seller's poller would.

- A whole shop replayed: the book's latest scores, after a sweep at the book's clock, equal
  ``cancel-risk score`` on the book's archive (``cancel-risk archive``) at that moment, posting
  for posting (probability, level, first reason); alerts reach the channel once each.
- The same records again, and a shuffled burst with duplicates: the same book.
- ``kill -9`` of the service mid-stream: no acknowledged push is lost, and after the restart no
  alert is delivered twice beyond the one that may be in flight at the kill (at least once).
- The database unreachable: pushes answered 503 in Ozon's error shape, never 200; /readyz 503.
"""

from __future__ import annotations

import csv
import json
import os
import random
import threading
from pathlib import Path
from typing import Any

import orjson
import pandas as pd
import pytest
from live_service import CLI, KEY, AlertInbox, LiveService, run_cli, running

from benchmarks.harness import spawn, stop_process
from benchmarks.postgres import create_database, start_postgres
from live.book import KEPT_PUSH_TYPES, OrderBook, digest_of, iter_records
from live.replay import build_timeline
from live.schema import pushes as pushes_table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sink() -> Any:
    server = AlertInbox().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def book_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'book.db'}"
    return create_database(request.getfixturevalue("postgres_url"), "live")


def _replay(history: Path, service: LiveService, *extra: str) -> str:
    return run_cli(
        "replay",
        "--history",
        str(history),
        "--url",
        service.url,
        "--speed",
        "0",
        "--api-key",
        KEY,
        *extra,
        cwd=service.work,
    ).stdout


def _archive(db_url: str, out: Path) -> Path:
    run_cli("archive", "--db", db_url, "--out", str(out), cwd=out.parent)
    return out


def _batch_scores(archive: Path, as_of: str, model: Path, work: Path) -> pd.DataFrame:
    out = work / "scores.parquet"
    run_cli(
        "score",
        "--history",
        str(archive),
        "--out",
        str(out),
        "--as-of",
        as_of,
        "--model",
        str(model),
        cwd=work,
    )
    return pd.read_parquet(out).set_index("posting_number")


def test_replayed_book_scores_equal_the_batch_on_its_archive(
    simulated_history: Path, tiny_model_dir: Path, book_url: str, tmp_path: Path, sink: AlertInbox
) -> None:
    service = LiveService(
        tiny_model_dir,
        book_url,
        tmp_path / "service",
        env={
            "CANCEL_RISK_ALERT_CHANNELS": json.dumps([sink.webhook()]),
            "CANCEL_RISK_ALERT_LEVEL": "medium",
        },
    )
    sink.received.clear()
    with running(service):
        printed = _replay(simulated_history, service)
        assert "refused 0" in printed.replace(":", "") or "0 refused" in printed, printed
        status = service.sweep()
        book = service.open_postings()
        archive = _archive(book_url, tmp_path / "archive")
    assert status["clock"] == status["last_sweep"]
    assert book, "the replay left no open posting"
    batch = _batch_scores(archive, status["clock"], tiny_model_dir, tmp_path)
    assert set(book) == set(batch.index)
    for number, row in book.items():
        expected = batch.loc[number]
        assert row["as_of"] == status["clock"]
        assert row["probability"] == pytest.approx(float(expected["probability"]), abs=1e-9)
        assert row["risk_level"] == expected["risk_level"]
    # Every alert raised is delivered, once per posting and level.
    keys = [(alert["posting_number"], alert["alert_key"]) for alert in sink.received]
    assert keys, "no posting reached medium risk: the alert path was not exercised"
    assert len(keys) == len(set(keys))
    assert status["alerts"] == len(keys)


def _book_content(db_url: str) -> dict[str, set[bytes]]:
    from live import schema

    book = OrderBook(db_url)
    try:
        with book.engine.connect() as connection:
            return {
                name: {
                    orjson.dumps(r, option=orjson.OPT_SORT_KEYS)
                    for r in iter_records(connection, table)
                }
                for name, table in (
                    ("postings", schema.postings),
                    ("pushes", schema.pushes),
                    ("prices", schema.prices),
                    ("scans", schema.scans),
                )
            }
    finally:
        book.close()


def test_duplicated_and_shuffled_records_give_the_same_book(
    simulated_history: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    clean_url = f"sqlite:///{tmp_path / 'clean.db'}"
    noisy_url = f"sqlite:///{tmp_path / 'noisy.db'}"
    with running(LiveService(tiny_model_dir, clean_url, tmp_path / "clean")) as service:
        _replay(simulated_history, service)
        first = service.status()
        _replay(simulated_history, service)  # everything again: nothing new
        again = service.status()
    for count in ("postings", "pushes", "prices", "scans"):
        assert again[count] == first[count]
    timeline = build_timeline(simulated_history, None)
    pushes = [record.body for record in timeline if record.kind == "push"]
    rng = random.Random(7)
    noisy = pushes + rng.sample(pushes, len(pushes) // 3)
    rng.shuffle(noisy)
    with running(LiveService(tiny_model_dir, noisy_url, tmp_path / "noisy")) as service:
        with service.client() as client:
            for push in noisy:
                response = client.post("/v1/ozon/push", content=orjson.dumps(push))
                assert response.status_code == 200, response.text
        _replay(simulated_history, service)  # the rest in order: postings, prices, scans
    assert _book_content(noisy_url) == _book_content(clean_url)


def test_kill_9_loses_no_acknowledged_push_and_repeats_no_alert(
    simulated_history: Path, tiny_model_dir: Path, tmp_path: Path, sink: AlertInbox
) -> None:
    url = f"sqlite:///{tmp_path / 'book.db'}"
    service = LiveService(
        tiny_model_dir,
        url,
        tmp_path / "service",
        env={
            "CANCEL_RISK_ALERT_CHANNELS": json.dumps([sink.webhook()]),
            "CANCEL_RISK_ALERT_LEVEL": "medium",
        },
    )
    sink.received.clear()
    timeline = build_timeline(simulated_history, None)
    pushes = [record.body for record in timeline if record.kind == "push"]
    postings = [record.body for record in timeline if record.kind == "posting"]
    acknowledged: list[dict[str, Any]] = []
    kills = 0
    service.start()
    try:
        with service.client() as client:
            for start in range(0, len(postings), 500):
                client.post("/v1/postings", json={"postings": postings[start : start + 500]})
        position = 0
        for stop_at in (len(pushes) // 3, 2 * len(pushes) // 3, len(pushes)):
            stopped = threading.Event()
            killer = None
            if stop_at < len(pushes):
                # kill -9 while pushes are in flight, from another thread

                def kill(stopped: threading.Event = stopped) -> None:
                    service.kill()
                    stopped.set()

                killer = threading.Timer(1.5, kill)
                killer.start()
            with service.client() as client:
                while position < len(pushes) and not stopped.is_set():
                    try:
                        response = client.post(
                            "/v1/ozon/push", content=orjson.dumps(pushes[position])
                        )
                    except Exception:
                        break
                    if response.status_code == 200:
                        acknowledged.append(pushes[position])
                    position += 1
            if killer is not None:
                killer.join()
                kills += 1
                service.start()
        service.wait_idle()
    finally:
        service.stop()
    book = OrderBook(url)
    try:
        with book.engine.connect() as connection:
            stored = {row.digest for row in connection.execute(pushes_table.select())}
    finally:
        book.close()
    assert kills == 2
    kept = [push for push in acknowledged if push["message_type"] in KEPT_PUSH_TYPES]
    assert len(kept) > 1000
    missing = [push for push in kept if digest_of(push) not in stored]
    assert not missing, f"{len(missing)} acknowledged pushes lost, e.g. {missing[:2]}"
    keys = [(alert["posting_number"], alert["alert_key"]) for alert in sink.received]
    assert keys
    assert len(keys) - len(set(keys)) <= kills  # at most the one in flight at each kill


def test_unreachable_database_answers_503_in_ozons_shape(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = start_postgres()
    try:
        url = create_database(server.url, "away")
        with running(LiveService(tiny_model_dir, url, tmp_path / "service")) as service:
            push = {
                "message_type": "TYPE_STATE_CHANGED",
                "posting_number": "1-1-1",
                "new_state": "posting_in_carriage",
                "changed_state_date": "2026-05-01T10:00:00Z",
            }
            with service.client() as client:
                assert client.post("/v1/ozon/push", json=push).status_code == 200
                server.stop()
                response = client.post("/v1/ozon/push", json={**push, "posting_number": "1-1-2"})
                assert response.status_code == 503
                error = response.json()["error"]
                assert error["code"] == "ERROR_UNKNOWN"
                assert "not stored" in error["message"]
                assert set(response.json()["error"]) == {"code", "message", "details"}
                assert client.get("/readyz").status_code == 503
    finally:
        server.stop()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_worker_of_its_own_scores_what_the_server_stores(
    simulated_history: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """``CANCEL_RISK_WORKER=false`` servers store; ``cancel-risk worker`` scores, elsewhere."""
    url = f"sqlite:///{tmp_path / 'book.db'}"
    service = LiveService(
        tiny_model_dir, url, tmp_path / "service", env={"CANCEL_RISK_WORKER": "false"}
    )
    with running(service):
        with service.client() as client:
            postings = [
                r.body for r in build_timeline(simulated_history, None) if r.kind == "posting"
            ]
            client.post("/v1/postings", json={"postings": postings[-300:]}).raise_for_status()
        assert service.status()["scores"] == 0  # nobody scores yet
        env = {
            **os.environ,
            "CANCEL_RISK_CLOCK": "events",
            "CANCEL_RISK_MODEL_CACHE_DIR": str(tmp_path / "worker-cache"),
        }
        command = [str(CLI), "worker", "--db", url, "--model", str(tiny_model_dir)]
        worker = spawn(command, tmp_path / "worker.log", env, cwd=tmp_path)
        try:
            status = service.wait_idle(timeout=120)
        finally:
            stop_process(worker)
    assert status["scores"] > 0 and status["pending"] == 0
    assert worker.returncode is not None
