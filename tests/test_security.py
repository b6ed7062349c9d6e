"""Security properties, checked on every run: what a reviewer would otherwise check by hand.

- ruff's security rules (bandit's, ``S``) are on and clean, and every exception is justified;
- nothing in the project unpickles: no pickle, joblib, dill, marshal or unsafe YAML load in the
  code, and scoring requests (whatever paths or model URIs they carry) open no file and unpickle
  nothing at run time;
- the service binds to 127.0.0.1 unless told otherwise;
- CORS is off unless ``CANCEL_RISK_CORS_ORIGINS`` names the origins;
- a real server at DEBUG level with its access log on writes no API key and none of the buyer's
  name, phone or address;
- the dependency audit (pip-audit) runs; a known vulnerability fails, an unreachable
  vulnerability service is reported and does not.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from benchmarks.dependency_audit import run_audit, summarise
from benchmarks.harness import (
    build_service_requests,
    start_service,
    stop_process,
    tool_environment,
    wait_ready,
)
from cancel_risk.cli import app as cli
from serving import app as service_app
from serving.app import create_app
from serving.settings import ServiceSettings

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("core", "simulator", "training", "batch", "serving", "benchmarks", "cancel_risk")
KEY = "security-scoring-key-5f1e"
ADMIN = "security-admin-key-9c2d"
BUYER_NAME = "Анна Секретова"
BUYER_PHONE = "+79161234567"
BUYER_STREET = "ул. Потаённая, д. 13"
ADDRESSEE_NAME = "Получатель Скрытный"
SECRETS = (KEY, ADMIN, BUYER_NAME, BUYER_PHONE, BUYER_STREET, ADDRESSEE_NAME)


def _with_buyer(request: dict[str, Any]) -> dict[str, Any]:
    """A request whose posting carries the buyer fields the Seller API may send."""
    changed = copy.deepcopy(request)
    posting = changed["posting"]
    posting["customer"] = {
        "customer_id": (posting.get("customer") or {}).get("customer_id", 1),
        "name": BUYER_NAME,
        "phone": BUYER_PHONE,
        "customer_email": "anna@example.org",
        "address": {"city": "Москва", "address_tail": BUYER_STREET, "zip_code": "101000"},
    }
    posting["addressee"] = {"name": ADDRESSEE_NAME, "phone": BUYER_PHONE}
    return changed


@pytest.fixture(scope="module")
def score_requests(simulated_history: Path) -> list[dict[str, Any]]:
    return [_with_buyer(r) for r in build_service_requests(simulated_history, 20, 10)]


# --- ruff's security rules -----------------------------------------------------------------------


def test_ruff_security_rules_are_selected_and_clean() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    lint = config["tool"]["ruff"]["lint"]
    assert "S" in lint["select"]
    assert not [rule for rule in lint.get("ignore", []) if rule.startswith("S") and rule != "S101"]
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("ruff")),
            *("check", "--output-format", "json", "--no-cache", *CODE_DIRS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    findings = [f for f in json.loads(result.stdout) if f["code"].startswith("S")]
    assert findings == [], [f"{f['filename']}:{f['location']['row']} {f['code']}" for f in findings]


def test_every_security_exception_says_why() -> None:
    """A ``# noqa: S...`` must carry its reason in parentheses, as the reviewed ones do."""
    unexplained = []
    for path in _code_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            match = re.search(r"#\s*noqa:\s*(S\d+[^#(]*)(\(.+\))?", line)
            if match and not match.group(2):
                unexplained.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not unexplained, unexplained


# --- no unpickling -------------------------------------------------------------------------------

# Calls that turn bytes into arbitrary Python objects (module, function).
UNSAFE_LOADS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("_pickle", "load"), ("_pickle", "loads"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"),
    ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"),
    ("marshal", "load"), ("marshal", "loads"),
    ("shelve", "open"),
    ("torch", "load"),
    ("yaml", "unsafe_load"), ("yaml", "full_load"),
    ("skops.io", "load"),
}  # fmt: skip
UNSAFE_METHODS = {"read_pickle", "unsafe_load"}


def _code_files() -> Iterator[Path]:
    for directory in CODE_DIRS:
        yield from sorted((ROOT / directory).rglob("*.py"))


def unsafe_deserialisation(source: str) -> list[str]:
    """Calls in ``source`` that unpickle, or load YAML or NumPy files unsafely."""
    tree = ast.parse(source)
    aliases: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attribute)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0],
                    None,
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = (node.module, alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = _dotted(node.func)
        if called is None:
            continue
        head, *rest = called.split(".")
        module, attribute = aliases.get(head, (head, None))
        parts = [p for p in [module, attribute, *rest] if p]
        qualified = ".".join(parts)
        module_part, _, function = qualified.rpartition(".")
        keywords = {k.arg: k.value for k in node.keywords}
        if (
            (module_part, function) in UNSAFE_LOADS
            or function in UNSAFE_METHODS
            or (
                function == "load"
                and module_part == "yaml"
                and not _is_safe_loader(keywords.get("Loader"))
            )
            or (
                module_part == "numpy"
                and function == "load"
                and isinstance(keywords.get("allow_pickle"), ast.Constant)
                and keywords["allow_pickle"].value
            )
        ):
            found.append(f"line {node.lineno}: {qualified}")
    return found


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _is_safe_loader(node: ast.AST | None) -> bool:
    return node is not None and (_dotted(node) or "").endswith(("SafeLoader", "CSafeLoader"))


def test_the_scanner_finds_unpickling_in_its_usual_spellings() -> None:
    source = (
        "import pickle\nimport joblib as jl\nfrom dill import loads\nimport numpy as np\n"
        "import yaml\nimport pandas as pd\n"
        "pickle.load(f)\njl.load(path)\nloads(b)\nnp.load(p, allow_pickle=True)\n"
        "yaml.load(text)\npd.read_pickle(p)\n"
        "yaml.load(text, Loader=yaml.SafeLoader)\nnp.load(p)\n"
    )
    assert [f.split(":")[0] for f in unsafe_deserialisation(source)] == [
        f"line {n}" for n in range(7, 13)
    ]


def test_no_code_unpickles_anything() -> None:
    found = {
        str(path.relative_to(ROOT)): hits
        for path in _code_files()
        if (hits := unsafe_deserialisation(path.read_text(encoding="utf-8")))
    }
    assert not found, found


class _FileAccess:
    """Records, from Python's audit hooks, files opened and objects unpickled while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.events: list[str] = []
        self._lock = threading.Lock()
        self._code = tuple(
            str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, ROOT / "serving"}
        )

    def __call__(self, event: str, args: tuple) -> None:
        if not self.on:
            return
        if event in ("pickle.find_class", "marshal.loads", "marshal.load"):
            with self._lock:
                self.events.append(f"{event} {args!r}"[:200])
        elif event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            is_code = path.endswith((".py", ".pyc")) and path.startswith(self._code)
            if not is_code:
                with self._lock:
                    self.events.append(f"open {path}")


_FILE_ACCESS = _FileAccess()
sys.addaudithook(_FILE_ACCESS)  # audit hooks cannot be removed: it records only while on


def test_scoring_requests_open_no_file_and_unpickle_nothing(
    tiny_model_dir: Path, score_requests: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Whatever a request carries (paths, model URIs), it is data: no file is read for it."""
    hostile = copy.deepcopy(score_requests[0])
    for key, value in [
        ("model", "models:/cancel-risk@champion"),
        ("model_uri", str(tiny_model_dir)),
        ("path", "/etc/passwd"),
        ("file", "../../../../root/.ssh/id_rsa"),
        ("pickle", "gASVAAAAAAAAAACMCGJ1aWx0aW5zlIwEZXZhbJSTlC4="),
    ]:
        hostile["posting"][key] = value
    hostile["posting"]["products"][0]["offer_id"] = str(tiny_model_dir / "booster.txt")
    spelled = copy.deepcopy(score_requests[1])  # a non-canonical price: the reference path
    price = spelled["posting"]["products"][0]["price"]
    spelled["posting"]["products"][0]["price"] = str(float(price)).replace(".", ",")
    calls = [
        ("/v1/score", {**score_requests[2]}),
        ("/v1/score", hostile),
        ("/v1/score", spelled),
        ("/v1/score", {**hostile, "model": str(tiny_model_dir)}),  # refused: unknown field
        ("/v1/score", {"posting": str(tiny_model_dir)}),
        ("/v1/score/batch", {"items": [hostile, spelled, {"posting": "/etc/passwd"}]}),
    ]
    settings = ServiceSettings(
        model_uri=str(tiny_model_dir), api_keys=(KEY,), model_cache_dir=tmp_path / "cache"
    )
    with TestClient(create_app(settings), headers={"X-API-Key": KEY}) as client:
        warm = [client.post(path, json=body).status_code for path, body in calls]
        assert warm == [200, 200, 200, 422, 422, 200]
        _FILE_ACCESS.events.clear()
        _FILE_ACCESS.on = True
        try:
            again = [client.post(path, json=body).status_code for path, body in calls]
            client.get("/v1/model")
        finally:
            _FILE_ACCESS.on = False
    assert again == warm
    assert _FILE_ACCESS.events == []


def test_the_file_access_recorder_sees_opens_and_unpickling(tmp_path: Path) -> None:
    import pickle

    target = tmp_path / "x.pkl"
    target.write_bytes(pickle.dumps(ValueError("x")))
    _FILE_ACCESS.events.clear()
    _FILE_ACCESS.on = True
    try:
        with target.open("rb") as handle:
            pickle.load(handle)
    finally:
        _FILE_ACCESS.on = False
    assert any(e.startswith("open ") and "x.pkl" in e for e in _FILE_ACCESS.events)
    assert any(e.startswith("pickle.find_class") for e in _FILE_ACCESS.events)


# --- where the service listens -------------------------------------------------------------------


def test_the_service_binds_to_loopback_unless_told_otherwise(monkeypatch) -> None:
    assert ServiceSettings().host == "127.0.0.1"
    assert ServiceSettings.from_env({}).host == "127.0.0.1"
    served: list[ServiceSettings] = []
    monkeypatch.setattr(service_app, "run_server", served.append)
    for variable in [v for v in os.environ if v.startswith("CANCEL_RISK_")]:
        monkeypatch.delenv(variable)
    runner = CliRunner()
    assert runner.invoke(cli, ["serve", "--model", "m"]).exit_code == 0
    monkeypatch.setenv("CANCEL_RISK_HOST", "0.0.0.0")
    assert runner.invoke(cli, ["serve", "--model", "m"]).exit_code == 0
    assert runner.invoke(cli, ["serve", "--model", "m", "--host", "::1"]).exit_code == 0
    assert [s.host for s in served] == ["127.0.0.1", "0.0.0.0", "::1"]


# --- CORS ----------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"}


def test_cors_is_off_unless_origins_are_configured(
    tiny_model_dir: Path, score_requests: list[dict[str, Any]], tmp_path: Path
) -> None:
    base = {"CANCEL_RISK_API_KEYS": KEY, "CANCEL_RISK_MODEL_CACHE_DIR": str(tmp_path)}
    closed = ServiceSettings.from_env(base, model_uri=str(tiny_model_dir))
    with TestClient(create_app(closed), headers={"X-API-Key": KEY}) as client:
        preflight = client.options("/v1/score", headers=PREFLIGHT)
        simple = client.post(
            "/v1/score", json=score_requests[0], headers={"Origin": PREFLIGHT["Origin"]}
        )
        assert simple.status_code == 200
        for response in (preflight, simple):
            assert not [h for h in response.headers if h.startswith("access-control-")]

    opened = ServiceSettings.from_env(
        {**base, "CANCEL_RISK_CORS_ORIGINS": "https://shop.example, https://crm.example"},
        model_uri=str(tiny_model_dir),
    )
    with TestClient(create_app(opened), headers={"X-API-Key": KEY}) as client:
        preflight = client.options("/v1/score", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://shop.example"
        assert "X-API-Key".lower() in preflight.headers["access-control-allow-headers"].lower()
        simple = client.post(
            "/v1/score", json=score_requests[0], headers={"Origin": PREFLIGHT["Origin"]}
        )
        assert simple.headers["access-control-allow-origin"] == "https://shop.example"
        stranger = client.options(
            "/v1/score", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in stranger.headers


# --- logs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_debug_level_server_logs_no_key_and_no_buyer_data(
    tiny_model_dir: Path, score_requests: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A real ``cancel-risk serve``, its access log on and every logger at DEBUG."""
    env = tool_environment()
    service, port, log = start_service(
        tiny_model_dir,
        tmp_path,
        env,
        api_key=KEY,
        extra_env={
            "CANCEL_RISK_ADMIN_KEY": ADMIN,
            "CANCEL_RISK_LOG_LEVEL": "debug",
            "CANCEL_RISK_ACCESS_LOG": "true",
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", service, log)
        listening = {
            c.laddr.ip
            for c in psutil.Process(service.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert listening == {"127.0.0.1"}
        headers = {"X-API-Key": KEY}
        body = score_requests[0]
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/v1/score", json=body, headers=headers).status_code == 200
            assert (
                client.post("/v1/score", json=body, headers={"X-API-Key": ADMIN}).status_code == 200
            )
            batch = {"items": [body, {"posting": BUYER_NAME}]}
            assert client.post("/v1/score/batch", json=batch, headers=headers).status_code == 200
            bad_price = copy.deepcopy(body)
            bad_price["posting"]["products"][0]["price"] = f"тел. {BUYER_PHONE}"
            assert client.post("/v1/score", json=bad_price, headers=headers).status_code == 422
            unknown = {"X-API-Key": KEY + "-" + BUYER_PHONE}
            assert client.post("/v1/score", json=body, headers=unknown).status_code == 401
            assert client.post("/v1/model/reload", headers=headers).status_code == 403
            assert client.post("/v1/model/reload", headers={"X-API-Key": ADMIN}).status_code == 200
    finally:
        stop_process(service)
    text = log.read_text(encoding="utf-8", errors="replace")
    # The log holds the access lines and the service's own: a vacuous pass is not possible.
    assert '"POST /v1/score HTTP/1.1" 200' in text
    assert '"POST /v1/model/reload HTTP/1.1" 200' in text
    assert "INFO serving.model_store: now serving" in text
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, leaked


# --- the dependency audit ------------------------------------------------------------------------


class DependencyAuditReport(UserWarning):
    """The audit's one-line result, shown in pytest's warnings summary on every run."""


def test_the_audit_summary_counts_vulnerabilities_and_what_could_not_be_audited() -> None:
    unknown = "Dependency not found on PyPI and could not be audited: c (3)"
    vulnerable = {"id": "PYSEC-1", "fix_versions": ["1.1"]}
    summary = summarise(
        {
            "dependencies": [
                {"name": "a", "version": "1.0", "vulns": [vulnerable]},
                {"name": "b", "version": "2.0", "vulns": []},
                {"name": "c", "skip_reason": unknown},
                {"name": "ozon-cancel-risk", "skip_reason": "distribution marked as editable"},
            ]
        }
    )
    assert (summary.packages, summary.audited, summary.not_audited) == (3, 2, 1)
    assert not summary.clean and not summary.conclusive
    assert summary.vulnerabilities[0]["id"] == "PYSEC-1"
    assert "a 1.0 PYSEC-1" in summary.describe()


@pytest.mark.slow
def test_the_dependency_audit_runs_and_finds_no_known_vulnerability() -> None:
    summary = run_audit(timeout_s=300)
    warnings.warn(summary.describe(), DependencyAuditReport, stacklevel=1)
    if not summary.ran:
        pytest.skip(f"the dependency audit could not run: {summary.error}")
    assert summary.packages > 50  # the service's whole environment was listed
    assert summary.clean, summary.describe()
