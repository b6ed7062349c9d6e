"""Hostile input (``tests/hostile.py``) against the loader, `cancel-risk score` and the service.

For every case of the corpus:

- the loader (``load_history`` and ``cancel-risk inspect``) rejects exactly the bad records,
  naming file, line and reason, gives the case's warnings, and keeps every valid record beside
  them; or, where the contract says the load stops, stops with one message naming the file;
- ``cancel-risk score``, run as a real process, exits 0 and scores exactly the valid open
  postings, with the bad records in the rejects file beside the scores; or exits 2 with one
  message and no traceback where the case must stop it;
- ``POST /v1/score`` on a real server answers the same hostile values inside a request with 422
  naming the field's JSON path (or 413, or scores what is valid), never a 500.

The 500 MB line is written once into a temporary directory, streamed, and deleted afterwards;
the peak memory of the processes that read it is measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from hostile import (
    CASES,
    REQUEST_CASES,
    BaseHistories,
    BaseHistory,
    HostileCase,
    Outcome,
    RequestCase,
    append_huge_line,
    append_lines,
    build_base_histories,
    dumps,
    new_posting,
)
from typer.testing import CliRunner

from benchmarks.harness import stop_process
from cancel_risk.cli import app
from cancel_risk.examples import load_history_records, open_score_requests
from core.errors import HistoryError
from core.ingest import load_history

CLI = Path(sys.executable).with_name("cancel-risk")
KEY = "hostile-scoring-key-0123"
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600
MIB = 2**20
# The 500 MB line would take more than this if it were read whole.
LOADER_PEAK_MIB = 400
SCORE_PEAK_MIB = 450

runner = CliRunner()


def _ids(cases: tuple[Any, ...]) -> list[str]:
    return [case.name for case in cases]


# --- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenCase:
    directory: Path
    outcome: Outcome
    base: BaseHistory


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> BaseHistories:
    return build_base_histories(tmp_path_factory.mktemp("hostile-base"))


@pytest.fixture(scope="module")
def corpus(
    bases: BaseHistories, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, WrittenCase]:
    """Each case written into its own copy of its base history."""
    root = tmp_path_factory.mktemp("hostile-corpus")
    written = {}
    for case in CASES:
        base = bases.jsonl if case.base == "jsonl" else bases.csv
        directory = Path(shutil.copytree(base.directory, root / case.name))
        written[case.name] = WrittenCase(directory, case.write(directory, base), base)
    return written


def _reject_records(frame: pd.DataFrame) -> list[tuple[str, int, str]]:
    return [
        (str(file), int(line), str(reason))
        for file, line, reason in zip(frame["file"], frame["line"], frame["reason"], strict=True)
    ]


def _assert_rejects(found: list[tuple[str, int, str]], outcome: Outcome) -> None:
    """Every expected reject is there (file, line, reason) and nothing else was rejected."""
    for expected in outcome.rejects:
        matches = [
            reason
            for file, line, reason in found
            if file == expected.file and line == expected.line and expected.reason in reason
        ]
        assert matches, f"no reject {expected} among {found}"
    assert len(found) == len(outcome.rejects), found


# --- the loader --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_the_loader_names_each_bad_record_and_keeps_every_valid_one(
    case: HostileCase, corpus: dict[str, WrittenCase]
) -> None:
    written = corpus[case.name]
    outcome, base = written.outcome, written.base
    inspected = runner.invoke(app, ["inspect", "--history", str(written.directory), "--json"])
    assert "Traceback" not in inspected.output
    if outcome.load_stops is not None:
        with pytest.raises(HistoryError) as raised:
            load_history(written.directory)
        assert outcome.load_stops in str(raised.value)
        assert inspected.exit_code == 2
        assert inspected.stderr.startswith("error: ") and outcome.load_stops in inspected.stderr
        return

    tables = load_history(written.directory)
    _assert_rejects(_reject_records(tables.rejects), outcome)
    for warning in outcome.warnings:
        assert any(warning in given for given in tables.report.warnings), tables.report.warnings
    assert set(tables.postings["posting_number"]) == base.posting_numbers | outcome.added
    assert len(tables.events) == base.events + outcome.events_added
    report = tables.report
    assert report.postings_read == (
        report.postings_kept + report.postings_rejected + report.duplicates_merged
    )

    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    _assert_rejects([(r["file"], r["line"], r["reason"]) for r in summary["rejects"]], outcome)
    assert summary["warnings"] == report.warnings


def test_a_cp1251_export_is_read_as_its_utf8_original(
    bases: BaseHistories, corpus: dict[str, WrittenCase]
) -> None:
    original = load_history(bases.csv.directory).postings
    recoded = load_history(corpus["cp1251_cabinet_csv"].directory).postings
    columns = ["posting_number", "status", "region", "city", "carrier_name", "ordered_at"]
    pd.testing.assert_frame_equal(recoded[columns], original[columns])
    assert original["region"].str.contains("край").any()  # Cyrillic text came through


# --- cancel-risk score -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRun:
    """One `cancel-risk score` process: its exit code, output and the files it was told to write."""

    returncode: int
    stdout: str
    stderr: str
    scores: Path

    @property
    def rejects(self) -> Path:
        return self.scores.with_name("scores.rejects.csv")

    @property
    def summary(self) -> Path:
        return self.scores.with_name("scores.summary.json")


def run_score(history: Path, out_dir: Path, model: Path, *options: str) -> ScoreRun:
    out_dir.mkdir(parents=True)
    scores = out_dir / "scores.parquet"
    command = [str(CLI), "score", "--history", str(history), "--out", str(scores)]
    completed = subprocess.run(
        [*command, "--model", str(model), *options],
        capture_output=True,
        text=True,
        cwd=out_dir,
        timeout=RUN_TIMEOUT_S,
    )
    return ScoreRun(completed.returncode, completed.stdout, completed.stderr, scores)


BASE_RUN = "base"
AGAIN = "+again"


@pytest.fixture(scope="module")
def score_runs(
    bases: BaseHistories,
    corpus: dict[str, WrittenCase],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, ScoreRun]:
    """`cancel-risk score` over every case (and the untouched base), two processes at a time."""
    root = tmp_path_factory.mktemp("hostile-scores")
    jobs: dict[str, tuple[Path, tuple[str, ...]]] = {BASE_RUN: (bases.jsonl.directory, ())}
    for name, written in corpus.items():
        options = written.outcome.options
        jobs[name] = (written.directory, options)
        if written.outcome.score_args:
            jobs[name + AGAIN] = (written.directory, (*options, *written.outcome.score_args))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(run_score, history, root / name, tiny_model_dir, *options)
            for name, (history, options) in jobs.items()
        }
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
def test_the_untouched_base_scores_every_open_posting(
    bases: BaseHistories, score_runs: dict[str, ScoreRun]
) -> None:
    run = score_runs[BASE_RUN]
    assert run.returncode == 0, run.stderr
    frame = pd.read_parquet(run.scores)
    assert set(frame["posting_number"]) == bases.jsonl.open_postings
    assert len(pd.read_csv(run.rejects)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_score_names_each_bad_record_and_scores_every_valid_open_posting(
    case: HostileCase, corpus: dict[str, WrittenCase], score_runs: dict[str, ScoreRun]
) -> None:
    outcome, base = corpus[case.name].outcome, corpus[case.name].base
    run = score_runs[case.name]
    assert "Traceback" not in run.stderr + run.stdout
    if outcome.load_stops is not None:
        assert run.returncode == 2
        assert f"error: {outcome.load_stops}" in run.stderr
        assert not run.scores.exists() and not run.rejects.exists()
        return
    if outcome.score_stops is not None:
        assert run.returncode == 2, run.stderr
        assert outcome.score_stops in run.stderr
        assert not run.scores.exists()
        if not outcome.score_args:  # refused for its rejects: they are listed all the same
            _assert_rejects(_reject_records(pd.read_csv(run.rejects)), outcome)
            assert json.loads(run.summary.read_text())["status"] == "failed"
            return
        run = score_runs[case.name + AGAIN]
        assert "Traceback" not in run.stderr

    assert run.returncode == 0, run.stderr
    _assert_rejects(_reject_records(pd.read_csv(run.rejects)), outcome)
    frame = pd.read_parquet(run.scores)
    expected = (base.open_postings | outcome.added) - outcome.not_scored
    assert frame["posting_number"].is_unique
    assert set(frame["posting_number"]) == expected
    summary = json.loads(run.summary.read_text())
    assert pd.Timestamp(summary["as_of"]) == base.as_of
    assert summary["postings"]["rejected"] == sum(
        1 for r in outcome.rejects if r.file.startswith(("postings", "orders"))
    )
    for warning in outcome.warnings:
        assert any(warning in given for given in summary["warnings"]), summary["warnings"]
    if outcome.same_scores_as_base:
        pd.testing.assert_frame_equal(frame, pd.read_parquet(score_runs[BASE_RUN].scores))


# --- the 500 MB line ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HugeHistory:
    directory: Path
    line: int
    neighbour: str
    reason: str  # why its line is rejected


@pytest.fixture(scope="module")
def huge_history(
    bases: BaseHistories, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HugeHistory]:
    """The base history with one 500 MB posting line and a valid posting after it."""
    directory = Path(shutil.copytree(bases.jsonl.directory, tmp_path_factory.mktemp("huge") / "h"))
    postings = directory / "postings.jsonl"
    line, length = append_huge_line(postings)
    append_lines(postings, [dumps(new_posting(bases.jsonl, "H-AFTER-HUGE-1"))])
    reason = f"line is {length:,} bytes long, more than the 16 MiB a record may take: not read"
    try:
        yield HugeHistory(directory, line, "H-AFTER-HUGE-1", reason)
    finally:
        postings.unlink()  # half a gigabyte is not left behind in the temporary directory


# VmHWM is the peak of this process image alone; ru_maxrss would also count the pytest process's
# size at the fork that started it. The reader's workers are forked from the loader itself.
LOAD_AND_MEASURE = """
import json, re, resource, sys
from pathlib import Path
from core.ingest import load_history
tables = load_history(sys.argv[1])
status = Path("/proc/self/status").read_text()
print(json.dumps({
    "rejects": tables.rejects.astype(str).to_dict("records"),
    "postings": tables.postings["posting_number"].tolist(),
    "peak_kib": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)),
    "workers_peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""

# The peak of `cancel-risk score` and its workers, started from a small process.
RUN_AND_MEASURE = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_a_500_mb_line_is_rejected_without_being_read_whole(
    huge_history: HugeHistory, bases: BaseHistories, tmp_path: Path
) -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(huge_history.directory)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_S,
    )
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout)
    assert result["rejects"] == [
        {"file": "postings.jsonl", "line": str(huge_history.line), "reason": huge_history.reason}
    ]
    assert set(result["postings"]) == bases.jsonl.posting_numbers | {huge_history.neighbour}
    assert result["peak_kib"] < LOADER_PEAK_MIB * 1024
    assert result["workers_peak_kib"] < LOADER_PEAK_MIB * 1024


@pytest.mark.slow
def test_score_over_a_500_mb_line_scores_the_rest_in_bounded_memory(
    huge_history: HugeHistory, bases: BaseHistories, tiny_model_dir: Path, tmp_path: Path
) -> None:
    scores = tmp_path / "scores.parquet"
    command = [str(CLI), "score", "--history", str(huge_history.directory), "--out", str(scores)]
    completed = subprocess.run(
        [sys.executable, "-c", RUN_AND_MEASURE, *command, "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=RUN_TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr
    peak_kib = int(completed.stderr.strip().splitlines()[-1])
    assert peak_kib < SCORE_PEAK_MIB * 1024
    rejects = pd.read_csv(tmp_path / "scores.rejects.csv")
    assert _reject_records(rejects) == [("postings.jsonl", huge_history.line, huge_history.reason)]
    scored = set(pd.read_parquet(scores)["posting_number"])
    assert scored == bases.jsonl.open_postings | {huge_history.neighbour}


# --- POST /v1/score ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`cancel-risk serve` of the tiny model on loopback (uvicorn), stopped after the module."""
    directory = tmp_path_factory.mktemp("hostile-service")
    port = _free_port()
    log = directory / "service.log"
    env = {
        **os.environ,
        "CANCEL_RISK_API_KEYS": KEY,
        "CANCEL_RISK_MODEL_CACHE_DIR": str(directory / "model-cache"),
        "CANCEL_RISK_ACCESS_LOG": "true",
    }
    command = [str(CLI), "serve", "--port", str(port), "--model", str(tiny_model_dir)]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            cwd=directory,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"the service was not ready in {START_TIMEOUT_S} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield Service(url, log)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def valid_body(bases: BaseHistories) -> dict[str, Any]:
    """A request for an open posting of the base history, with pushes and prices of its own."""
    records = load_history_records(bases.jsonl.directory)
    as_of = int(bases.jsonl.as_of.value) // 1000 * 1000
    for request in open_score_requests(records, as_of, latest_per_kind=20):
        if request["pushes"] and request["prices"]:
            return request
    raise AssertionError("no open posting with pushes and prices")


def _post(service: Service, body: dict[str, Any] | bytes) -> httpx.Response:
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{service.url}/v1/score", content=content, headers=headers, timeout=60)


@pytest.mark.slow
@pytest.mark.parametrize("case", REQUEST_CASES, ids=_ids(REQUEST_CASES))
def test_score_route_answers_hostile_values_with_the_field_path_never_500(
    case: RequestCase, service: Service, valid_body: dict[str, Any]
) -> None:
    response = _post(service, case.build(valid_body))
    assert response.status_code == case.status, response.text
    if case.status == 200:
        scored = response.json()
        assert scored["posting_number"] == valid_body["posting"]["posting_number"]
        if case.same_as is not None:
            reference = _post(service, case.same_as(valid_body))
            assert reference.status_code == 200, reference.text
            assert scored["probability"] == pytest.approx(reference.json()["probability"], abs=1e-9)
        return
    detail = response.json()["detail"]
    assert all(error["msg"] for error in detail)
    if case.loc == ("body",):  # the body itself is unusable: where in it is a detail
        assert detail[0]["loc"][0] == "body" and case.message in detail[0]["msg"]
    else:
        assert any(
            tuple(error["loc"]) == case.loc and case.message in error["msg"] for error in detail
        ), detail


@pytest.mark.slow
def test_the_batch_route_scores_the_valid_items_beside_the_hostile_ones(
    service: Service, valid_body: dict[str, Any]
) -> None:
    hostile = [
        (case, body)
        for case in REQUEST_CASES
        if case.status == 422 and not isinstance(body := case.build(valid_body), bytes)
    ]
    items: list[Any] = [valid_body]
    for _, body in hostile:
        items += [body, valid_body]
    response = httpx.post(
        f"{service.url}/v1/score/batch",
        json={"items": items},
        headers={"X-API-Key": KEY},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    batch = response.json()
    assert (batch["scored"], batch["rejected"]) == (len(hostile) + 1, len(hostile))
    single = _post(service, valid_body).json()
    for position, result in enumerate(batch["results"]):
        if position % 2 == 0:
            assert result["status"] == "scored"
            assert result["score"]["probability"] == single["probability"]
            continue
        case = hostile[position // 2][0]
        assert result["status"] == "rejected"
        expected = ("body", "items", position, *case.loc[1:])
        assert any(tuple(e["loc"]) == expected for e in result["errors"]), result["errors"]


@pytest.mark.slow
def test_a_declared_500_mb_body_is_refused_before_it_is_read(
    service: Service, valid_body: dict[str, Any]
) -> None:
    """The service answers 413 on the request's headers: not a byte of the body is read."""
    host, port = service.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/score HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"X-API-Key: {KEY}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {500 * MIB}\r\n"
        "\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head.encode())
        answer = b""
        while chunk := connection.recv(65536):  # the service closes the connection after it
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:200]
    detail = json.loads(rest.partition(b"\r\n\r\n")[2])["detail"]
    assert detail == "the request body is larger than the limit of 33554432 bytes"
    assert _post(service, valid_body).status_code == 200  # the service carries on


@pytest.mark.slow
def test_the_service_logged_no_traceback_and_no_500(service: Service) -> None:
    """After the hostile requests above (same module, file order) nothing escaped as a crash."""
    refused = _post(service, b'{"posting": {"products": [{"price": "NaN"}]}}')
    assert refused.status_code == 422
    log = service.log.read_text(encoding="utf-8", errors="replace")
    assert '"POST /v1/score HTTP/1.1" 422' in log  # the access log is on: statuses are in it
    assert "Traceback" not in log
    assert '" 500' not in log
    assert "unexpected" not in log
