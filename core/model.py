"""The cancellation-risk model: LightGBM, a calibrator, cost-based risk levels, and its contract.

A :class:`RiskModel` is everything scoring needs and nothing else: the booster, the calibrator,
the two risk thresholds, the feature version and columns it was trained on, the category levels
fixed at training, and the history aggregates learned in training (so serving never recomputes
them from one request). It is saved as plain files, no pickle:

- ``booster.txt``: LightGBM's model text, trimmed to the best iteration;
- ``calibrator.json``: the calibrator's arrays;
- ``model.json``: feature version, columns, category levels, thresholds and training metadata;
- ``aggregates/<name>.parquet``: the learned history aggregates.

Training, the REST service and the nightly batch all score through :meth:`RiskModel.score_tables`
(which calls the one feature function) or :meth:`RiskModel.score_features` on its output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightgbm as lgb
import numpy as np
import pandas as pd

from core.aggregates import HistoryAggregates
from core.calibration import Calibrator, calibrator_from_dict
from core.features import FEATURE_VERSION, build_features

if TYPE_CHECKING:
    from core.costs import CostsConfig
    from core.tables import HistoryTables

logger = logging.getLogger(__name__)

MODEL_FORMAT_VERSION = 1
RISK_LEVELS = ("low", "medium", "high")

BOOSTER_FILE = "booster.txt"  # LightGBM's text model, inside a saved model directory
_CALIBRATOR_FILE = "calibrator.json"
_METADATA_FILE = "model.json"
_AGGREGATES_DIR = "aggregates"
# Below this many rows one thread predicts faster than a pool (no OpenMP start-up per call).
_SINGLE_THREAD_MAX_ROWS = 512
# Up to this many rows the feature matrix is built through Python objects (see FeatureEncoder).
_SMALL_FRAME_ROWS = 64


# The artifact of the logged MLflow model that holds its :meth:`RiskModel.save` files.
RISK_MODEL_ARTIFACT = "risk_model"


def risk_model_files(logged_model_dir: str | Path) -> Path:
    """Where a downloaded cancel-risk MLflow model keeps its :meth:`RiskModel.save` files."""
    path = Path(logged_model_dir) / "artifacts" / RISK_MODEL_ARTIFACT
    if not path.is_dir():
        raise IncompatibleModelError(
            f"{logged_model_dir} is not a cancel-risk model: it has no artifacts/"
            f"{RISK_MODEL_ARTIFACT} directory"
        )
    return path


class IncompatibleModelError(Exception):
    """A saved model that this code cannot score with (other feature version or format)."""


@dataclass(frozen=True)
class RiskThresholds:
    """Probability cut-offs: ``medium <= p < high`` is medium risk, ``p >= high`` is high."""

    medium: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"medium": self.medium, "high": self.high}


def build_risk_thresholds(costs: CostsConfig) -> RiskThresholds:
    """Choose the two thresholds that minimise the expected cost of a posting.

    Let ``p`` be the calibrated probability that the buyer cancels if the seller does nothing,
    ``C`` the cost of a buyer cancellation (shipping and return), and an intervention ``a`` cost
    ``c_a`` and prevent a share ``e_a`` of would-be cancellations. Its expected saving over doing
    nothing is linear in ``p``::

        S_a(p) = p · e_a · C − c_a

    - Contacting the buyer pays off when ``S_contact(p) > 0``, i.e.
      ``p > c_contact / (e_contact · C)``: that is the **medium** threshold.
    - Holding and confirming pays off when ``S_hold(p) > 0``, i.e. ``p > c_hold / (e_hold · C)``,
      and beats contacting when ``S_hold(p) > S_contact(p)``, i.e.
      ``p > (c_hold − c_contact) / ((e_hold − e_contact) · C)``. Both must hold for hold to be
      the best action, so the **high** threshold is the larger of the two.

    Between the thresholds contacting is the cheapest choice in expectation; above ``high``,
    holding is. When ``high <= medium`` no probability makes contacting best and the medium band
    is empty. Thresholds above 1 are never reached (the intervention never pays).
    """
    scale = costs.cancelled_order_cost
    medium = costs.contact_cost / (costs.contact_effect * scale)
    hold_pays = costs.hold_cost / (costs.hold_effect * scale)
    hold_beats_contact = (costs.hold_cost - costs.contact_cost) / (
        (costs.hold_effect - costs.contact_effect) * scale
    )
    return RiskThresholds(medium=float(medium), high=float(max(hold_pays, hold_beats_contact)))


def assign_risk_levels(probabilities: np.ndarray, thresholds: RiskThresholds) -> np.ndarray:
    """``low``/``medium``/``high`` for each probability (NaN gives ``low``: no evidence of risk)."""
    p = np.asarray(probabilities, dtype="float64")
    levels = np.full(p.shape, RISK_LEVELS[0], dtype=object)
    levels[p >= thresholds.medium] = RISK_LEVELS[1]
    levels[p >= thresholds.high] = RISK_LEVELS[2]
    return levels


@dataclass
class RiskModel:
    """A trained, calibrated cancellation-risk model with its feature contract.

    Construct it with :func:`fit_risk_model` or :meth:`load`. The column positions and the
    category lookups are built once here, so scoring a single posting does no set-up work.
    """

    booster: lgb.Booster
    calibrator: Calibrator
    thresholds: RiskThresholds
    feature_version: str
    feature_columns: tuple[str, ...]
    category_levels: Mapping[str, tuple[str, ...]]
    aggregates: HistoryAggregates | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.feature_columns = tuple(self.feature_columns)
        self.category_levels = {k: tuple(v) for k, v in self.category_levels.items()}
        unknown = set(self.category_levels) - set(self.feature_columns)
        if unknown:
            raise ValueError(f"category levels for columns that are not features: {unknown}")
        if self.booster.num_feature() != len(self.feature_columns):
            raise ValueError(
                f"the booster has {self.booster.num_feature()} features, "
                f"the model lists {len(self.feature_columns)}"
            )
        self._encoder = FeatureEncoder(self.feature_columns, self.category_levels)

    @property
    def categorical_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.feature_columns if c in self.category_levels)

    def build_matrix(self, features: pd.DataFrame) -> np.ndarray:
        """The float matrix the booster reads: numeric columns as they are, categories as codes.

        A category level not seen in training (a new carrier, a new region) and a missing value
        both become NaN, which LightGBM routes as missing: scored, never an error.
        """
        return self._encoder.build_matrix(features)

    def build_matrix_from_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """:meth:`build_matrix` of feature rows held as dicts (column -> value), as the REST
        service holds a request's row: the same encoder, without a frame."""
        return self._encoder.build_matrix_from_rows(rows)

    def score_raw(self, features: pd.DataFrame) -> np.ndarray:
        """The booster's uncalibrated probabilities."""
        return self.predict_matrix_raw(self.build_matrix(features))

    def predict_matrix_raw(self, matrix: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities for a matrix from :meth:`build_matrix`."""
        threads = 1 if len(matrix) <= _SINGLE_THREAD_MAX_ROWS else 0
        return self.booster.predict(matrix, num_threads=threads)

    def score_features(self, features: pd.DataFrame) -> np.ndarray:
        """Calibrated probabilities for feature rows (the output of ``build_features``)."""
        if len(features) == 0:
            return np.empty(0, dtype="float64")
        return self.calibrator.transform(self.score_raw(features))

    def risk_levels(self, probabilities: np.ndarray) -> np.ndarray:
        return assign_risk_levels(probabilities, self.thresholds)

    def score_tables(self, tables: HistoryTables, as_of: pd.Timestamp) -> pd.DataFrame:
        """Score every posting open at ``as_of``: ``posting_number, probability, risk_level``.

        Features come from the one feature function with the aggregates learned in training.
        """
        features = build_features(tables, as_of, aggregates=self.aggregates)
        probabilities = self.score_features(features)
        return pd.DataFrame(
            {
                "posting_number": pd.array(features.index, dtype="string"),
                "probability": probabilities,
                "risk_level": pd.array(self.risk_levels(probabilities), dtype="string"),
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write the model as plain files into the (new or empty) directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if any(path.iterdir()):
            raise FileExistsError(f"{path} is not empty")
        (path / BOOSTER_FILE).write_text(self.booster.model_to_string(), encoding="utf-8")
        _write_json(path / _CALIBRATOR_FILE, self.calibrator.to_dict())
        _write_json(
            path / _METADATA_FILE,
            {
                "format_version": MODEL_FORMAT_VERSION,
                "feature_version": self.feature_version,
                "feature_columns": list(self.feature_columns),
                "category_levels": {k: list(v) for k, v in self.category_levels.items()},
                "thresholds": self.thresholds.to_dict(),
                "has_aggregates": self.aggregates is not None,
                "metadata": self.metadata,
            },
        )
        if self.aggregates is not None:
            frames_dir = path / _AGGREGATES_DIR
            frames_dir.mkdir()
            for name, frame in self.aggregates.to_frames().items():
                frame.to_parquet(frames_dir / f"{name}.parquet")
        return path

    @classmethod
    def load(cls, path: str | Path, *, expected_feature_version: str | None = None) -> RiskModel:
        """Read a model written by :meth:`save`.

        Refuses (``IncompatibleModelError``) a model whose feature version is not the one this
        code builds (``core.features.FEATURE_VERSION`` unless ``expected_feature_version``
        is given): its columns would silently mean something else.
        """
        path = Path(path)
        meta = _read_json(path / _METADATA_FILE)
        if meta.get("format_version") != MODEL_FORMAT_VERSION:
            raise IncompatibleModelError(
                f"model at {path} has format version {meta.get('format_version')!r}, "
                f"this code reads {MODEL_FORMAT_VERSION}"
            )
        if expected_feature_version is None:
            expected_feature_version = FEATURE_VERSION
        if meta["feature_version"] != expected_feature_version:
            raise IncompatibleModelError(
                f"model at {path} was trained on feature version {meta['feature_version']!r}, "
                f"this code builds feature version {expected_feature_version!r}; retrain it"
            )
        aggregates = None
        if meta.get("has_aggregates"):
            frames = {
                file.stem: pd.read_parquet(file)
                for file in sorted((path / _AGGREGATES_DIR).glob("*.parquet"))
            }
            aggregates = HistoryAggregates.from_frames(frames)
        return cls(
            booster=lgb.Booster(model_file=str(path / BOOSTER_FILE)),
            calibrator=calibrator_from_dict(_read_json(path / _CALIBRATOR_FILE)),
            thresholds=RiskThresholds(**meta["thresholds"]),
            feature_version=meta["feature_version"],
            feature_columns=tuple(meta["feature_columns"]),
            category_levels=meta["category_levels"],
            aggregates=aggregates,
            metadata=meta.get("metadata", {}),
        )


def build_category_levels(values: pd.Series) -> tuple[str, ...]:
    """The sorted distinct non-missing levels of a categorical column, as strings."""
    levels = values.astype("string").dropna().unique()
    return tuple(sorted(str(v) for v in levels))


class FeatureEncoder:
    """Turns feature rows into the float matrix the booster reads.

    Numeric columns are copied as float64; categorical columns become the position of their
    level among the levels fixed at training (NaN when missing or unseen). The column positions
    and the level lookups are built once here, so encoding a posting does no set-up work.

    Two paths give the same numbers: a few rows (a REST request) go through one object array and
    dict lookups, which costs tens of microseconds instead of the hundreds a column-wise pandas
    path costs per call; larger frames go column-wise and vectorised.
    """

    def __init__(
        self, feature_columns: Sequence[str], category_levels: Mapping[str, Sequence[str]]
    ):
        self.feature_columns = tuple(feature_columns)
        self._column_index = pd.Index(self.feature_columns)
        self._all_positions = np.arange(len(self.feature_columns))
        positions = {name: i for i, name in enumerate(self.feature_columns)}
        self._numeric_columns = [c for c in self.feature_columns if c not in category_levels]
        self._numeric_positions = np.array(
            [positions[c] for c in self._numeric_columns], dtype="int64"
        )
        self._category_indexes = [
            (name, positions[name], pd.Index(list(levels), dtype="string"))
            for name, levels in category_levels.items()
        ]
        self._category_maps = [
            (positions[name], {level: float(code) for code, level in enumerate(levels)})
            for name, levels in category_levels.items()
        ]

    def build_matrix(self, features: pd.DataFrame) -> np.ndarray:
        if features.columns.equals(self._column_index):
            columns = self._all_positions  # build_features' own layout: no lookup needed
        else:
            columns = features.columns.get_indexer(self._column_index)
        if (columns < 0).any():
            missing = [c for c, i in zip(self.feature_columns, columns, strict=True) if i < 0]
            raise KeyError(f"feature columns missing from the frame: {missing}")
        if len(features) <= _SMALL_FRAME_ROWS:
            try:
                return self._build_small(features.to_numpy(dtype=object)[:, columns])
            except (TypeError, ValueError):
                pass  # a nullable numeric column (pd.NA): the column-wise path handles it
        return self._build_columnwise(features)

    def build_matrix_from_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The matrix of rows given as dicts; missing numbers may be None or NaN."""
        values = np.array(
            [[row[column] for column in self.feature_columns] for row in rows], dtype=object
        ).reshape(len(rows), len(self.feature_columns))
        numeric = values[:, self._numeric_positions]
        missing = numeric == None  # noqa: E711 (elementwise on an object array)
        values[:, self._numeric_positions] = np.where(missing, np.nan, numeric)
        return self._build_small(values)

    def _build_small(self, values: np.ndarray) -> np.ndarray:
        matrix = np.empty(values.shape, dtype="float64")
        matrix[:, self._numeric_positions] = values[:, self._numeric_positions].astype("float64")
        for position, codes in self._category_maps:
            matrix[:, position] = [
                np.nan if _is_na(value) else codes.get(str(value), np.nan)
                for value in values[:, position]
            ]
        return matrix

    def _build_columnwise(self, features: pd.DataFrame) -> np.ndarray:
        matrix = np.empty((len(features), len(self.feature_columns)), dtype="float64")
        if self._numeric_columns:
            matrix[:, self._numeric_positions] = features[self._numeric_columns].to_numpy(
                dtype="float64", na_value=np.nan
            )
        for name, position, levels in self._category_indexes:
            codes = levels.get_indexer(features[name].astype("string")).astype("float64")
            codes[codes < 0] = np.nan
            matrix[:, position] = codes
        return matrix


def _is_na(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IncompatibleModelError(
            f"{path.parent} is not a saved risk model: no {path.name}"
        ) from None
