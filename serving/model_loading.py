"""Loading a model version safely: what ``model_uri`` names, fetching it, checking its boosters.

- :func:`parse_model_uri` reads ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or the
  directory of a saved :class:`RiskModel`.
- :func:`load_risk_model_from_mlflow` downloads a registered pyfunc and reads its risk model from
  its plain files: nothing the model logged is run in the service.
- LightGBM's model reader brings the whole process down on some malformed files (a booster file
  cut short crashes its parallel tree parser instead of raising), so every booster file is first
  read by LightGBM's library in a throwaway process (:func:`check_booster_files`); a file that
  crashes or fails it there is refused and never reaches the serving process.
- :func:`classify_failure` tells a failure to retry later (the tracking server is unreachable)
  from one to fix (not found, or the model refused).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.model import BOOSTER_FILE, IncompatibleModelError, RiskModel, risk_model_files
from serving.settings import ServiceSettings

LoadFailure = Literal["unreachable", "not_found", "refused"]
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))")


class ModelLoadError(Exception):
    """A model that could not be loaded; ``kind`` says whether to retry or to fix the model."""

    def __init__(self, kind: LoadFailure, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ModelSpec:
    """What ``model_uri`` names."""

    uri: str
    name: str
    alias: str | None = None
    version: str | None = None
    path: Path | None = None


def parse_model_uri(uri: str) -> ModelSpec:
    """``models:/name@alias``, ``models:/name/version``, or a directory of a saved RiskModel."""
    match = _URI.fullmatch(uri.strip())
    if match is not None:
        return ModelSpec(
            uri=uri, name=match["name"], alias=match["alias"], version=match["version"]
        )
    path = Path(uri).expanduser()
    if "://" not in uri and (path / "model.json").is_file():
        return ModelSpec(uri=uri, name=path.name, path=path)
    raise ModelLoadError(
        "not_found",
        f"model_uri {uri!r} is neither models:/<name>@<alias>, models:/<name>/<version> "
        "nor a directory holding a saved risk model",
    )


def apply_registry_settings(settings: ServiceSettings) -> None:
    """Bound how long a call to the tracking server may take (unless the operator set it).

    MLflow reads these from the environment at each call; the server's entry point sets them.
    """
    timeout = str(max(1, round(settings.registry_timeout_seconds)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", timeout)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.registry_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def classify_failure(exc: BaseException) -> ModelLoadError:
    """A load failure as unreachable (retry later), not found, or refused (fix the model)."""
    if isinstance(exc, ModelLoadError):
        return exc
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, IncompatibleModelError):
            return ModelLoadError("refused", f"incompatible model: {error}")
    text = " ".join(str(error) for error in chain)
    names = {type(error).__name__ for error in chain}
    if names & {"ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError"} or (
        "API request to" in text and ("failed with exception" in text or "Max retries" in text)
    ):
        return ModelLoadError(
            "unreachable", f"the tracking server is unreachable: {short_error(exc)}"
        )
    code = getattr(exc, "error_code", None)
    if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
        return ModelLoadError("not_found", short_error(exc))
    return ModelLoadError("refused", f"the model could not be loaded: {short_error(exc)}")


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The exception's type and message on one line, cut to ``limit`` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# Reads one booster file with LightGBM's C library and nothing else (no numpy, no pandas), so the
# check costs a few milliseconds; without the library's path it falls back to the Python package.
_BOOSTER_CHECK = """
import sys
library, booster = sys.argv[1], sys.argv[2]
if library:
    import ctypes
    lib = ctypes.cdll.LoadLibrary(library)
    lib.LGBM_GetLastError.restype = ctypes.c_char_p
    handle, iterations = ctypes.c_void_p(), ctypes.c_int()
    if lib.LGBM_BoosterCreateFromModelfile(
        booster.encode(), ctypes.byref(iterations), ctypes.byref(handle)
    ):
        sys.stderr.write(lib.LGBM_GetLastError().decode("utf-8", "replace") + "\\n")
        sys.exit(3)
    lib.LGBM_BoosterFree(handle)
else:
    import lightgbm
    lightgbm.Booster(model_file=booster)
"""
BOOSTER_CHECK_TIMEOUT_S = 300.0


def _lightgbm_library() -> str:
    """The path of LightGBM's shared library, where its package keeps it ("" if not found)."""
    spec = importlib.util.find_spec("lightgbm")
    if spec is None or not spec.submodule_search_locations:
        return ""
    package = Path(next(iter(spec.submodule_search_locations)))
    for directory in (package / "lib", package / "bin", package.parent):
        for library in sorted(directory.glob("lib_lightgbm.*")):
            if library.suffix in (".so", ".dylib", ".dll"):
                return str(library)
    return ""


def check_booster_files(directory: str | Path, timeout_s: float = BOOSTER_CHECK_TIMEOUT_S) -> None:
    """Read every booster file under ``directory`` with LightGBM in a child process first.

    Raises :class:`ModelLoadError` (refused) naming the file when LightGBM crashes on it,
    refuses it, or takes longer than ``timeout_s``; the serving process is never at risk.
    """
    library = _lightgbm_library()
    for booster in sorted(Path(directory).rglob(BOOSTER_FILE)):
        command = [sys.executable, "-I", "-S", "-c", _BOOSTER_CHECK, library, str(booster)]
        if not library:
            command.remove("-S")  # the fallback imports the lightgbm package
        try:
            result = subprocess.run(  # noqa: S603 (this interpreter, a fixed script, no shell)
                command, capture_output=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            raise ModelLoadError(
                "refused", f"LightGBM did not read {booster.name} within {timeout_s:.0f} s"
            ) from None
        if result.returncode != 0:
            output = (result.stderr + result.stdout).decode("utf-8", "replace").splitlines()
            fatal = [line for line in output if "[Fatal]" in line or "Error" in line]
            reason = (fatal or output or [""])[-1].strip()
            how = (
                f"crashed LightGBM's reader (signal {-result.returncode})"
                if result.returncode < 0
                else "was refused by LightGBM"
            )
            message = f"the model's {booster.name} is broken: it {how}"
            raise ModelLoadError("refused", (f"{message}: {reason}" if reason else message)[:500])


def load_risk_model_from_mlflow(uri: str) -> RiskModel:
    """The :class:`RiskModel` inside the cancel-risk pyfunc at ``uri`` (``models:/name/3``).

    The model's files are downloaded and their boosters checked (:func:`check_booster_files`)
    before the model is read from its plain files (``core.pyfunc.risk_model_files``): nothing
    the model logged is run in the service.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="cancel-risk-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        check_booster_files(local)
        return RiskModel.load(risk_model_files(local))
