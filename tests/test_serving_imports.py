"""The dependency direction: ``serving`` imports only ``core`` of the project; nothing but the
command line imports ``serving``, and it only lazily, in the ``serve`` command; importing the
service does no work (no settings read, no files written). The whole layering is import-linter's
contracts in pyproject.toml; these tests add what it cannot see: function-level imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "simulator", "training", "batch", "serving", "benchmarks", "cancel_risk")


def _package(module: str) -> str:
    return module.split(".", 1)[0]


def _imports(tree: ast.AST, *, module_level: bool = False) -> list[tuple[str, int]]:
    """Absolute imports in ``tree``; with ``module_level``, not those inside functions."""
    found = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
        todo += [
            child
            for child in ast.iter_child_nodes(node)
            if not (module_level and isinstance(child, functions))
        ]
    return found


def test_serving_imports_only_core() -> None:
    offending = []
    for path in sorted((ROOT / "serving").rglob("*.py")):
        for module, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if _package(module) in PACKAGES and _package(module) not in ("core", "serving"):
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offending, offending


def test_only_the_serve_command_imports_serving_and_lazily() -> None:
    offending = []
    paths = [
        p
        for package in ("core", "simulator", "training", "batch")
        for p in (ROOT / package).rglob("*.py")
    ]
    cli = ROOT / "cancel_risk" / "cli.py"
    for path in sorted([*paths, cli]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # The command line may import the service inside its serve command only.
        for module, line in _imports(tree, module_level=path == cli):
            if _package(module) == "serving":
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offending, offending


def test_importing_the_service_does_no_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCEL_RISK_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import serving.app, benchmarks.rest, cancel_risk.examples, serving.model_store,"
        " benchmarks.soak, benchmarks.fuzz, benchmarks.dependency_audit;"
        "import os; print(os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(env.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
