"""The dependency direction: ``serving`` imports only the shared contract from ``training``, and
``training`` never imports ``serving`` except lazily in the ``serve`` command; importing the
service does no work (no settings read, no files written)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The contract both sides share: tables, ingestion record parsers, features (with the
# aggregates they look up), the model wrapper and the explanations.
SHARED_CONTRACT = (
    "training.tables",
    "training.ingest",
    "training.features",
    "training.aggregates",
    "training.model",
    "training.explain",
)


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


def test_serving_imports_only_the_shared_contract_from_training() -> None:
    offending = []
    for path in sorted((ROOT / "serving").rglob("*.py")):
        for module, line in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            from_training = module == "training" or module.startswith("training.")
            shared = any(module == m or module.startswith(m + ".") for m in SHARED_CONTRACT)
            if from_training and not shared:
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offending, offending


def test_training_imports_serving_only_lazily_in_the_serve_command() -> None:
    offending = []
    for path in sorted((ROOT / "training").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for module, line in _imports(tree, module_level=True):
            if module == "serving" or module.startswith("serving."):
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offending, offending


def test_importing_the_service_does_no_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANCEL_RISK_")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import serving.app, serving.benchmark, serving.examples, serving.model_store,"
        " serving.soak, serving.fuzz, serving.dependency_audit;"
        "import os; print(os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(env.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
