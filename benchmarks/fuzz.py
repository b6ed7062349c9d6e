"""API fuzzing: requests generated from the service's own OpenAPI document, sent over HTTP.

One run, on this machine, loopback only::

    python -m benchmarks.fuzz --min-requests 1000 --out-json fuzz.json

The service (``cancel-risk serve --model DIR``, a real model: ``--model DIR --history DIR``, else
one simulated and trained as :mod:`benchmarks.rest` does) is started as its own process on
127.0.0.1 and sent, in rounds until ``--min-requests`` have gone out:

- **schema cases** — Schemathesis reads ``/openapi.json`` as served and generates, for every
  operation, requests that fit the schema (positive) and requests that break it (negative: wrong
  types, missing fields, out-of-range values), with a scoring key; and a few negative cases of
  the key itself;
- **mutated requests** — real requests built from the history (postings open at ten moments,
  with their own events), with one to three values anywhere inside replaced by generated JSON
  (any type, empty, huge, odd Unicode) or removed, sent alone and inside batches. The schema
  leaves the Seller API's records open (``posting`` is any object), so only these reach the
  feature code with hostile values.

Every response is checked: no 5xx; every 4xx is JSON whose ``detail`` names the problem (a
non-empty message, or for 422 a list of ``{loc, msg, type}`` with the field's path); documented
responses match their schema (Schemathesis's ``response_schema_conformance``); a 200 score has a
probability in [0, 1]. The service's log must hold no error line. The exit code is 1 when any
check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    API_KEY,
    build_service_requests,
    error_log_lines,
    model_and_history,
    run_command,
    start_service,
    stop_process,
    tool_environment,
    wait_ready,
)

logger = logging.getLogger(__name__)

ADMIN_KEY = "fuzz-admin-key"
REQUEST_TIMEOUT_S = 60.0
_MAX_FAILURES_KEPT = 20
_DELETE = "<delete>"


@dataclass
class FuzzRecord:
    """Requests sent, by source, operation and status, and the checks that failed."""

    sent: Counter[str] = field(default_factory=Counter)  # by source
    by_operation: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    by_source_status: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    failure_count: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def add(
        self, source: str, operation: str, status: int, problems: list[str], request: str
    ) -> None:
        self.sent[source] += 1
        self.by_operation[operation] += 1
        self.by_status[status] += 1
        self.by_source_status[f"{source} {status}"] += 1
        if problems:
            self.failure_count += 1
            if len(self.failures) < _MAX_FAILURES_KEPT:
                self.failures.append(
                    {
                        "source": source,
                        "operation": operation,
                        "status": status,
                        "problems": problems,
                        "request": request[:800],
                    }
                )


def response_problems(operation: str, status: int, content_type: str, body: bytes) -> list[str]:
    """What is wrong with a response, whatever the request was (empty when nothing is)."""
    if status >= 500:
        return [f"server error {status}: {body[:300].decode('utf-8', 'replace')}"]
    if status < 400:
        if operation == "POST /v1/score" and status == 200:
            return _score_problems(body)
        return []
    if not content_type.startswith("application/json"):
        return [f"{status} with content type {content_type!r}, not JSON"]
    try:
        document = json.loads(body)
    except ValueError:
        return [f"{status} body is not JSON: {body[:200]!r}"]
    detail = document.get("detail") if isinstance(document, dict) else None
    if isinstance(detail, str):
        return [] if detail.strip() else [f"{status} with an empty detail"]
    if not isinstance(detail, list) or not detail:
        return [f"{status} without a detail naming the problem: {body[:200]!r}"]
    problems = []
    for entry in detail:
        if not isinstance(entry, dict) or not str(entry.get("msg") or "").strip():
            problems.append(f"{status} detail entry without a message: {entry!r}"[:300])
        elif status == 422 and not (isinstance(entry.get("loc"), list) and entry["loc"]):
            problems.append(f"422 detail entry without the field's path: {entry!r}"[:300])
    return problems


def _score_problems(body: bytes) -> list[str]:
    try:
        scored = json.loads(body)
        probability = float(scored["probability"])
    except (ValueError, KeyError, TypeError):
        return [f"a 200 score without a probability: {body[:200]!r}"]
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0):
        return [f"a 200 score with probability {probability}"]
    return []


# --- schema cases (Schemathesis) -----------------------------------------------------------------


def _schema_strategies(
    schema: Any, key: str, admin_key: str, examples: int
) -> Iterator[tuple[str, str, Any, int]]:
    """(operation, mode, strategy, examples) for every operation, positive and negative.

    The routes get their keys (the admin key for the admin route), except in the cases that
    negate the key itself (missing, empty or malformed). A reload with the admin key loads the
    model again, and has no input to vary: two of those per round are enough.
    """
    from schemathesis import GenerationMode

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        admin = "reload" in operation.path
        headers = {"X-API-Key": admin_key if admin else key}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, headers=headers)
            yield label, mode.value, strategy, min(examples, 2) if admin else examples
        negated = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        yield label, "negative-key", negated, examples


def _run_examples(strategy: Any, examples: int, send: Callable[[Any], None]) -> None:
    """Draw up to ``examples`` values of ``strategy`` and ``send`` each (no shrinking)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    @settings(
        max_examples=examples,
        verbosity=Verbosity.quiet,
        print_blob=False,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(value=strategy)
    def run(value: Any) -> None:
        send(value)

    run()


def fuzz_schema(
    base_url: str,
    schema: Any,
    record: FuzzRecord,
    examples: int,
    key: str,
    admin_key: str,
    session: Any,
) -> None:
    """One round of Schemathesis cases over every operation of the served document."""
    from hypothesis.errors import HypothesisException
    from schemathesis.specs.openapi.checks import response_schema_conformance

    for label, mode, strategy, budget in _schema_strategies(schema, key, admin_key, examples):

        def send(case: Any, label: str = label) -> None:
            request = f"{case.method} {case.formatted_path} body={case.body!r}"
            try:
                response = case.call(base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S)
            except Exception as exc:  # a refused or dropped connection is a failure too
                record.add("schema", label, 0, [f"no response: {type(exc).__name__}"], request)
                return
            content_type = (response.headers.get("content-type") or [""])[0]
            problems = response_problems(
                label, response.status_code, content_type, response.content
            )
            try:
                case.validate_response(response, checks=[response_schema_conformance])
            except Exception as exc:
                problems.append(f"response does not match the document: {exc}"[:500])
            record.add("schema", label, response.status_code, problems, request)

        try:
            _run_examples(strategy, budget, send)
        except HypothesisException as exc:
            record.skipped.append(f"{label} {mode}: {type(exc).__name__}")


# --- mutated real requests -----------------------------------------------------------------------


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into ``value`` (keys and list indices), containers included."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*prefix, key)
            yield from _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield (*prefix, index)
            yield from _paths(inner, (*prefix, index))


def _apply(request: dict[str, Any], edits: list[tuple[tuple, Any]]) -> dict[str, Any]:
    changed = copy.deepcopy(request)
    for path, value in edits:
        target: Any = changed
        try:
            for part in path[:-1]:
                target = target[part]
            if value == _DELETE:
                del target[path[-1]]
            else:
                target[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the container
    return changed


def mutated_request_strategy(requests: list[dict[str, Any]]) -> Any:
    """Real requests with one to three values replaced by generated JSON, or removed."""
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text()
        | st.sampled_from(
            ["", " ", "0", "-1", "1e309", "NaN", "2026-02-30T00:00:00Z", "9999-12-31T23:59:59Z"]
        )
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=8,
    )

    def edits_of(request: dict[str, Any]) -> Any:
        paths = list(_paths(request))
        edit = st.tuples(st.sampled_from(paths), values | st.just(_DELETE))
        return st.lists(edit, min_size=1, max_size=3).map(lambda found: _apply(request, found))

    return st.sampled_from(requests).flatmap(edits_of)


def fuzz_mutations(
    base_url: str,
    requests: list[dict[str, Any]],
    record: FuzzRecord,
    examples: int,
    key: str,
    session: Any,
) -> None:
    """One round of mutated real requests: alone to ``/v1/score``, in pairs to the batch."""
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    sent = [0]

    def send(body: dict[str, Any]) -> None:
        sent[0] += 1
        if sent[0] % 4 == 0:
            path, payload = "/v1/score/batch", {"items": [body, requests[sent[0] % len(requests)]]}
        else:
            path, payload = "/v1/score", body
        # json.dumps writes NaN and Infinity as bare words: the service must refuse them cleanly.
        data = json.dumps(payload, ensure_ascii=sent[0] % 2 == 0).encode("utf-8", "surrogatepass")
        label = f"POST {path}"
        request = f"{label} body={data[:600]!r}"
        try:
            response = session.post(
                base_url + path, data=data, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
        except Exception as exc:  # a refused or dropped connection is a failure too
            record.add("mutation", label, 0, [f"no response: {type(exc).__name__}"], request)
            return
        problems = response_problems(
            label, response.status_code, response.headers.get("content-type", ""), response.content
        )
        if path.endswith("batch") and response.status_code == 200:
            try:
                results = response.json()["results"]
                untouched_scored = len(results) == 2 and results[1]["status"] == "scored"
            except (ValueError, KeyError, TypeError, IndexError):
                untouched_scored = False
            if not untouched_scored:
                problems.append(f"the untouched batch item was not scored: {response.text}"[:300])
        record.add("mutation", label, response.status_code, problems, request)

    _run_examples(mutated_request_strategy(requests), examples, send)


# --- the run -------------------------------------------------------------------------------------


def fuzz_service(
    base_url: str,
    requests: list[dict[str, Any]],
    *,
    target_requests: int,
    examples_per_round: int,
    key: str = API_KEY,
    admin_key: str = ADMIN_KEY,
    max_rounds: int = 50,
) -> FuzzRecord:
    """Rounds of schema cases and mutations until ``target_requests`` have been sent.

    A round draws ``examples_per_round`` cases per operation and mode from the document, and
    four times as many mutated real requests (the only ones that reach the feature code).
    """
    import requests as http
    import schemathesis

    record = FuzzRecord()
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    with http.Session() as session:
        for round_ in range(max_rounds):
            before = record.total
            fuzz_schema(base_url, schema, record, examples_per_round, key, admin_key, session)
            fuzz_mutations(base_url, requests, record, 4 * examples_per_round, key, session)
            logger.info(
                "round %d: %d requests, %d failed", round_, record.total, record.failure_count
            )
            if record.total >= target_requests or record.total == before:
                break
    return record


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the service, fuzz it, stop it; the counts and the failures."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    begin = time.perf_counter()
    env = tool_environment()
    with tempfile.TemporaryDirectory(prefix="cancel-risk-fuzz-") as tmp:
        work = Path(tmp)
        model_dir, history = model_and_history(args, work, env)
        requests = build_service_requests(history, args.requests, args.events_per_kind)
        service, port, log = start_service(
            model_dir, work, env, extra_env={"CANCEL_RISK_ADMIN_KEY": ADMIN_KEY}
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(f"{base_url}/readyz", service, log)
            record = fuzz_service(
                base_url,
                requests,
                target_requests=args.min_requests,
                examples_per_round=args.examples,
            )
            alive = service.poll() is None
        finally:
            stop_process(service)
        errors = error_log_lines(log)
    statuses = {str(k): v for k, v in sorted(record.by_status.items())}
    report: dict[str, Any] = {
        "started": started,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.fuzz", *sys.argv[1:]]),
        "seconds": round(time.perf_counter() - begin, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "requests": record.total,
        "by_source": dict(record.sent),
        "by_operation": dict(sorted(record.by_operation.items())),
        "by_status": statuses,
        "by_source_and_status": dict(sorted(record.by_source_status.items())),
        "server_errors": sum(v for k, v in record.by_status.items() if k >= 500),
        "client_errors": sum(v for k, v in record.by_status.items() if 400 <= k < 500),
        "failed_checks": record.failure_count,
        "failures": record.failures,
        "skipped": record.skipped,
        "service_alive_at_end": alive,
        "error_log_lines": errors[:20],
    }
    missed = []
    if record.total < args.min_requests:
        missed.append(f"only {record.total} requests sent (target {args.min_requests})")
    if record.failure_count:
        missed.append(f"{record.failure_count} responses failed a check")
    if not alive:
        missed.append("the service died")
    if errors:
        missed.append(f"{len(errors)} error lines in the service's log")
    report["missed"] = missed
    report["passed"] = not missed
    return report


def format_markdown(report: dict[str, Any]) -> str:
    sources = ", ".join(f"{count:,} {source}" for source, count in report["by_source"].items())
    statuses = ", ".join(f"{status}: {count:,}" for status, count in report["by_status"].items())
    machine = report["machine"]
    return "\n".join(
        [
            f"Fuzz: {report['requests']:,} generated requests ({sources}) in "
            f"{report['seconds']:.0f} s; {report['server_errors']} 5xx; "
            f"{report['client_errors']:,} 4xx, every one checked for a JSON detail; "
            f"{report['failed_checks']} failed checks.",
            f"Statuses: {statuses}.",
            f"Load average {machine['load_average_before'][0]} before, "
            f"{machine['load_average_after'][0]} after; {report['started']}. "
            + (
                "All checks passed."
                if report["passed"]
                else "MISSED: " + "; ".join(report["missed"])
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--min-requests", type=int, default=1000, help="Send at least this many requests."
        )
        parser.add_argument(
            "--examples", type=int, default=60, help="Examples per operation and mode in a round."
        )

    report = run_command(argv, __doc__.splitlines()[0], add_arguments, run, format_markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
