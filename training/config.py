"""The training configuration: one YAML file, validated by pydantic, passed down explicitly.

The defaults live in ``training/default_config.yaml`` (package data). A user file is merged
over them, then ``overrides`` (for example from the retraining notebook) over that, so a file
only has to name what it changes. Every section rejects unknown keys: a typo is an error that
names the field, never a silently ignored setting.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.costs import CostsConfig
from training.dataset import SnapshotConfig

DEFAULT_CONFIG_RESOURCE = "default_config.yaml"


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the offending field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LightGBMConfig(_Section):
    """Booster hyper-parameters and the boosting schedule.

    Only the parameters below can be set; the objective (binary log loss) is fixed by the task.
    """

    learning_rate: float = Field(0.05, gt=0, le=1)
    num_leaves: int = Field(31, ge=2)
    max_depth: int = Field(-1, ge=-1)
    min_data_in_leaf: int = Field(50, ge=1)
    feature_fraction: float = Field(0.9, gt=0, le=1)
    bagging_fraction: float = Field(0.9, gt=0, le=1)
    bagging_freq: int = Field(1, ge=0)
    lambda_l1: float = Field(0.0, ge=0)
    lambda_l2: float = Field(1.0, ge=0)
    cat_smooth: float = Field(10.0, ge=0)
    min_data_per_group: int = Field(50, ge=1)
    n_jobs: int = Field(2, ge=1)
    seed: int = 0
    num_boost_round: int = Field(600, ge=1)
    early_stopping_rounds: int = Field(50, ge=1)

    def booster_params(self) -> dict[str, Any]:
        """The parameter dict for ``lightgbm.train`` (schedule settings excluded)."""
        params = self.model_dump(exclude={"n_jobs", "num_boost_round", "early_stopping_rounds"})
        params.update(
            objective="binary",
            metric="binary_logloss",
            num_threads=self.n_jobs,
            deterministic=True,
            force_row_wise=True,
            verbosity=-1,
        )
        return params


class CalibrationConfig(_Section):
    """How raw booster scores become probabilities (fitted on the calibration split)."""

    # The methods of core.calibration.fit_calibrator (its CalibrationMethod).
    method: Literal["isotonic", "sigmoid", "beta", "venn_abers"] = "isotonic"
    # Calibrated probabilities stay within [min_probability, 1 - min_probability].
    min_probability: float = Field(0.001, ge=0, lt=0.5)


class PromotionConfig(_Section):
    """When a challenger replaces the champion: by how much it must beat it on the holdout."""

    metric: Literal["roc_auc", "pr_auc", "brier", "log_loss", "ece"] = "log_loss"
    min_improvement: float = Field(0.001, ge=0)

    @property
    def higher_is_better(self) -> bool:
        return self.metric in ("roc_auc", "pr_auc")


class EvaluationConfig(_Section):
    """How the holdout is measured and explained."""

    ece_bins: int = Field(10, ge=2)
    top_fraction: float = Field(0.1, gt=0, le=1)
    shap_sample_rows: int = Field(2000, ge=10)
    min_slice_rows: int = Field(30, ge=1)


class MlflowConfig(_Section):
    """Where runs and models go. The tracking URI is MLflow's own (``MLFLOW_TRACKING_URI``)."""

    experiment_name: str = Field("cancel-risk", min_length=1)
    registered_model_name: str = Field("cancel-risk", min_length=1)


class TrainingConfig(_Section):
    """Everything a training run needs besides the history and ``as_of``."""

    snapshots: SnapshotConfig = Field(default_factory=SnapshotConfig)
    lightgbm: LightGBMConfig = Field(default_factory=LightGBMConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    costs: CostsConfig = Field(default_factory=CostsConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    def to_yaml(self) -> str:
        """The full, resolved configuration as YAML (what a run logs)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_training_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainingConfig:
    """Load the defaults, merge the YAML file at ``path`` and then ``overrides`` over them.

    Raises :class:`ConfigError` naming the file and the field when the result is not valid.
    """
    merged = _read_yaml_mapping(resources.files("training") / DEFAULT_CONFIG_RESOURCE, "defaults")
    source = "defaults"
    if path is not None:
        merged = _deep_merge(merged, _read_yaml_mapping(Path(path), str(path)))
        source = str(path)
    if overrides:
        merged = _deep_merge(merged, overrides)
        source = f"{source} with overrides"
    try:
        return TrainingConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid training config ({source}): {_describe(exc)}") from None


def _read_yaml_mapping(path: Any, label: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read training config {label}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {label} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"training config {label} must be a mapping of sections")
    return data


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, recursing into mappings present in both."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError) -> str:
    """One line per problem: ``section.field: message``."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)
