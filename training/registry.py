"""MLflow: the experiment, the logged pyfunc model, the registry aliases and promotion.

The tracking store is MLflow's own choice: ``MLFLOW_TRACKING_URI`` when set, otherwise
MLflow 3's default, a SQLite database ``mlflow.db`` in the working directory (with artifacts
under ``./mlruns``), which supports the model registry. Nothing here sets it.

A training run logs one pyfunc model (see :mod:`core.pyfunc`) that MLflow builds from code
at load time; the project's ``core`` package (everything scoring needs) travels with it as code,
and the project's runtime dependencies, pinned to the versions that trained it, are its pip
requirements, so it loads (and ``mlflow models serve`` runs it) in a fresh environment.

Aliases: every trained version becomes ``challenger``; :func:`promote_if_better` moves
``champion`` to it only when it beats the current champion on the challenger's own holdout
(the test rows logged with its run), by the configured metric and margin.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

import core
from core.model import RISK_MODEL_ARTIFACT, IncompatibleModelError, RiskModel
from core.pyfunc import MODEL_CODE, build_signature, load_risk_model
from training.evaluate import compute_metrics

if TYPE_CHECKING:
    from training.config import EvaluationConfig, PromotionConfig

logger = logging.getLogger(__name__)

CHALLENGER_ALIAS = "challenger"
CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "model"
HOLDOUT_ARTIFACT = "holdout/test.parquet"
PROJECT_DISTRIBUTION = "ozon-cancel-risk"
_CODE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


class PromotionError(Exception):
    """Promotion cannot be decided: no such version, no challenger, no holdout."""


# --- experiment and run contents -----------------------------------------------------------


def ensure_experiment(name: str, client: MlflowClient | None = None) -> str:
    """The id of the experiment ``name``, created when missing."""
    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def build_dataset_digest(frame: pd.DataFrame) -> str:
    """A content hash of a frame: its columns, dtypes and every value (16 hex digits)."""
    digest = hashlib.sha256()
    digest.update(repr([(c, str(t)) for c, t in frame.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def log_metric_group(prefix: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` as ``<prefix>/<name>`` in the active run."""
    mlflow.log_metrics({f"{prefix}/{name}": float(value) for name, value in metrics.items()})


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``section.key`` parameters."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_holdout(test: pd.DataFrame) -> None:
    """Store the test rows (moments, labels, features) with the run, for later promotion."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(HOLDOUT_ARTIFACT).name
        test.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(HOLDOUT_ARTIFACT).parent))


def load_holdout(run_id: str) -> pd.DataFrame:
    """The test rows logged by :func:`log_holdout` in run ``run_id``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=HOLDOUT_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError) as exc:
            raise PromotionError(f"run {run_id} has no holdout to compare on: {exc}") from None
        return pd.read_parquet(path)


# --- the model -----------------------------------------------------------------------------


def project_pip_requirements() -> list[str]:
    """The project's runtime dependencies, pinned to the installed versions."""
    pinned = []
    for spec in importlib.metadata.requires(PROJECT_DISTRIBUTION) or []:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra (dev, spark): not needed to score
        version = importlib.metadata.version(requirement.name)
        pinned.append(f"{requirement.name}=={version}")
    return sorted(pinned)


def log_risk_model(
    risk_model: RiskModel,
    *,
    input_example: pd.DataFrame | None,
    registered_model_name: str | None,
) -> ModelInfo:
    """Log ``risk_model`` as the pyfunc scoring pipeline in the active run (and register it)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = risk_model.save(tmp_path / RISK_MODEL_ARTIFACT)
        code_file = tmp_path / "cancel_risk_model.py"
        code_file.write_text(MODEL_CODE, encoding="utf-8")
        package_dir = Path(core.__file__).parent
        code_copy = shutil.copytree(package_dir, tmp_path / "code" / "core", ignore=_CODE_IGNORE)
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_NAME,
            python_model=str(code_file),
            artifacts={RISK_MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(code_copy)],
            pip_requirements=project_pip_requirements(),
            signature=build_signature(),
            input_example=input_example,
            registered_model_name=registered_model_name,
            metadata={"feature_version": str(risk_model.feature_version)},
        )


def set_alias(name: str, alias: str, version: str, client: MlflowClient | None = None) -> None:
    (client or MlflowClient()).set_registered_model_alias(name, alias, version)


def get_version_by_alias(
    name: str, alias: str, client: MlflowClient | None = None
) -> ModelVersion | None:
    """The version behind ``alias``, or None when the alias (or the model) does not exist."""
    try:
        return (client or MlflowClient()).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in (
            ErrorCode.Name(RESOURCE_DOES_NOT_EXIST),
            "INVALID_PARAMETER_VALUE",
        ):
            return None
        raise


# --- promotion -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionResult:
    """What :func:`promote_if_better` decided and on which numbers."""

    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion before the decision
    metric: str
    challenger_value: float | None
    champion_value: float | None
    reason: str


def is_better(challenger: float, champion: float, promotion: PromotionConfig) -> bool:
    """Whether ``challenger`` beats ``champion`` by at least ``min_improvement``."""
    gain = challenger - champion if promotion.higher_is_better else champion - challenger
    return gain >= promotion.min_improvement and gain > 0


def promote_if_better(
    model_name: str,
    promotion: PromotionConfig,
    evaluation: EvaluationConfig,
    version: str | None = None,
    client: MlflowClient | None = None,
) -> PromotionResult:
    """Make ``version`` (default: the ``challenger``) the ``champion`` if it beats the champion.

    Both models score the challenger's holdout (the test rows logged with its run) and are
    compared on ``promotion.metric``. With no champion yet the challenger becomes champion; a
    champion that this code cannot load (another feature version: serving would refuse it too)
    is replaced.
    """
    client = client or MlflowClient()
    challenger = _resolve_version(client, model_name, version)
    champion = get_version_by_alias(model_name, CHAMPION_ALIAS, client)
    promoted, reason, values = _compare_with_champion(
        model_name, challenger, champion, promotion, evaluation
    )
    if promoted:
        set_alias(model_name, CHAMPION_ALIAS, challenger.version, client)
    logger.info("promotion of %s v%s: %s", model_name, challenger.version, reason)
    return PromotionResult(
        promoted=promoted,
        challenger_version=str(challenger.version),
        champion_version=None if champion is None else str(champion.version),
        metric=promotion.metric,
        challenger_value=values[0],
        champion_value=values[1],
        reason=reason,
    )


def _compare_with_champion(
    model_name: str,
    challenger: ModelVersion,
    champion: ModelVersion | None,
    promotion: PromotionConfig,
    evaluation: EvaluationConfig,
) -> tuple[bool, str, tuple[float | None, float | None]]:
    """(promote or not, why, (challenger value, champion value)) on the challenger's holdout."""
    if champion is None:
        return True, "no champion yet", (None, None)
    if str(champion.version) == str(challenger.version):
        return False, f"version {challenger.version} is already the champion", (None, None)
    holdout = load_holdout(challenger.run_id)
    challenger_model = load_risk_model(f"models:/{model_name}/{challenger.version}")
    try:
        champion_model = load_risk_model(f"models:/{model_name}/{champion.version}")
    except IncompatibleModelError as exc:
        return True, f"the champion cannot be scored by this code: {exc}", (None, None)
    metric = promotion.metric
    labels = holdout["label"].to_numpy(dtype="int64")
    options = {"ece_bins": evaluation.ece_bins, "top_fraction": evaluation.top_fraction}
    new = compute_metrics(labels, challenger_model.score_features(holdout), **options)[metric]
    old = compute_metrics(labels, champion_model.score_features(holdout), **options)[metric]
    verdict = "beats" if is_better(new, old, promotion) else "does not beat"
    reason = (
        f"{metric} {new:.4f} {verdict} the champion's {old:.4f} (v{champion.version}) "
        f"by the required {promotion.min_improvement}"
    )
    return is_better(new, old, promotion), reason, (new, old)


def _resolve_version(client: MlflowClient, name: str, version: str | None) -> ModelVersion:
    if version is None:
        challenger = get_version_by_alias(name, CHALLENGER_ALIAS, client)
        if challenger is None:
            raise PromotionError(f"model {name!r} has no {CHALLENGER_ALIAS!r} version to promote")
        return challenger
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise PromotionError(f"model {name!r} has no version {version}") from None
