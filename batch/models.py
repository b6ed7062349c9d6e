"""Which model a batch run scores with, and the name and version it writes beside each score.

``--model`` takes an MLflow model URI (``models:/cancel-risk@champion``, ``models:/cancel-risk/3``,
``runs:/<run>/model``, ...), a local directory holding a logged pyfunc (an ``MLmodel`` file), or
a plain :class:`~core.model.RiskModel` directory (``model.json``, as ``RiskModel.save``
writes it). A registry URI records the registered name and version; anything else records the
directory's (or URI's) name and a fingerprint of the model's content, so the output always
says exactly which model produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from core.model import IncompatibleModelError, RiskModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/cancel-risk@champion"
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


class ModelSourceError(Exception):
    """The model cannot be found or loaded; the message says which and why."""


@dataclass(frozen=True)
class ScoringModel:
    """A loaded model with the identity written into every output row."""

    risk_model: RiskModel
    name: str
    version: str
    uri: str


def build_model_fingerprint(model: RiskModel) -> str:
    """A content hash of everything that decides a score (16 hex digits)."""
    digest = hashlib.sha256()
    contract = {
        "feature_version": model.feature_version,
        "feature_columns": list(model.feature_columns),
        "category_levels": {k: list(v) for k, v in sorted(model.category_levels.items())},
        "thresholds": model.thresholds.to_dict(),
        "calibrator": model.calibrator.to_dict(),
    }
    digest.update(json.dumps(contract, sort_keys=True, default=str).encode())
    digest.update(model.booster.model_to_string().encode())
    if model.aggregates is not None:
        for name, frame in sorted(model.aggregates.to_frames().items()):
            digest.update(name.encode())
            digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def load_scoring_model(uri: str) -> ScoringModel:
    """Load the model behind ``uri`` (see the module docstring); a clear error otherwise."""
    path = Path(uri)
    try:
        if "://" not in uri and (path / "model.json").is_file():
            model = RiskModel.load(path)
            return ScoringModel(model, path.resolve().name, build_model_fingerprint(model), uri)
        registry = _REGISTRY_URI.match(uri)
        if registry is not None:
            return _load_registered(uri, registry)
        if "://" not in uri and ":/" not in uri and not path.exists():
            raise ModelSourceError(f"model {uri!r}: no such directory and not an MLflow URI")
        model = _load_pyfunc(uri)
        name = path.resolve().name if path.exists() else uri.rstrip("/")
        return ScoringModel(model, name, build_model_fingerprint(model), uri)
    except IncompatibleModelError as exc:
        raise ModelSourceError(f"model {uri!r} cannot be scored by this code: {exc}") from None


def _load_registered(uri: str, match: re.Match[str]) -> ScoringModel:
    """Resolve an alias to its version first, so the version recorded is the one loaded."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = match["name"]
    version = match["version"]
    if version is None:
        try:
            version = str(MlflowClient().get_model_version_by_alias(name, match["alias"]).version)
        except MlflowException as exc:
            raise ModelSourceError(
                f"model {uri!r}: the registry has no alias {match['alias']!r} for {name!r} "
                f"({_first_line(exc)}); train and promote a model first, or pass --model"
            ) from None
    model = _load_pyfunc(f"models:/{name}/{version}")
    logger.info("model %s resolved to %s version %s", uri, name, version)
    return ScoringModel(model, name, str(version), uri)


def _load_pyfunc(uri: str) -> RiskModel:
    from mlflow.exceptions import MlflowException

    from core.pyfunc import load_risk_model

    try:
        return load_risk_model(uri)
    except (MlflowException, OSError) as exc:
        raise ModelSourceError(f"model {uri!r} cannot be loaded: {_first_line(exc)}") from None
    except AttributeError:
        raise ModelSourceError(
            f"model {uri!r} is an MLflow model but not a cancel-risk scoring pipeline"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
