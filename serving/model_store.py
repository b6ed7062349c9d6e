"""The model the service scores with: loaded by alias, reloaded live, refused when broken.

- At startup (:meth:`ModelStore.load_initial`) the model named by ``model_uri`` is loaded:
  ``models:/<name>@<alias>`` is resolved to a version in the MLflow registry and that version's
  pyfunc is loaded and unwrapped to its :class:`RiskModel`. If that fails (tracking server
  unreachable, alias missing, model refused) the last good model cached locally is served
  instead, and ``/v1/model`` says so.
- :meth:`ModelStore.reload` (the admin route and the optional polling) loads the alias's
  current version; a version that fails to load, has a feature version this code does not
  build, or cannot score the probe requests is refused and the old model keeps serving.
- Every model loaded from the registry is written to the cache directory (plain files, no
  pickle: ``RiskModel.save``), atomically, replacing the previous one.
- Every booster file is read by LightGBM in a throwaway process before the serving process
  reads it (:mod:`serving.model_loading`, which also names and fetches the model).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from core.features import FEATURE_VERSION
from core.model import RiskModel
from serving.model_loading import (
    ModelLoadError,
    ModelSpec,
    check_booster_files,
    classify_failure,
    load_risk_model_from_mlflow,
    parse_model_uri,
    short_error,
)
from serving.probes import build_probe_jobs
from serving.scoring import ModelScorer, RoutesDisagree
from serving.settings import ServiceSettings

logger = logging.getLogger(__name__)

ModelSource = Literal["registry", "local_cache", "local_path"]
_POINTER = "current.json"


@dataclass(frozen=True)
class ModelRecord:
    """What ``/v1/model`` reports about the model being served."""

    name: str
    version: str | None
    alias: str | None
    uri: str
    source: ModelSource
    feature_version: str
    run_id: str | None
    training_period: dict[str, str] | None
    holdout_metrics: dict[str, float]
    loaded_at: str
    registry_error: str | None
    scoring_path: str
    fast_path_note: str | None


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    scorer: ModelScorer

    @property
    def model(self) -> RiskModel:
        return self.scorer.model


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: ``loaded``, ``unchanged``, or why it was refused."""

    status: Literal["loaded", "unchanged", "refused", "not_found", "unreachable"]
    message: str
    previous_version: str | None
    current: ModelRecord | None


@dataclass(frozen=True)
class _Resolved:
    """A concrete model version to load."""

    version: str | None
    run_id: str | None
    load_uri: str


def _now_iso() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat().replace("+00:00", "Z")


class ModelStore:
    """Holds the model being served and replaces it only with a model that works.

    ``current`` is swapped in one assignment, so requests in flight keep the model they
    started with. Loads are serialised by a lock; they run in worker threads (the event loop
    keeps serving while a model is downloaded and checked).
    """

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        load_from_uri: Callable[[str], RiskModel] = load_risk_model_from_mlflow,
    ) -> None:
        self.settings = settings
        self.spec: ModelSpec | None = None
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self._load_from_uri = load_from_uri
        self._lock = threading.Lock()

    # --- public -------------------------------------------------------------------------------

    def load_initial(self) -> LoadedModel | None:
        """Load the configured model, else the cached one; None when neither is available."""
        with self._lock:
            try:
                self.spec = parse_model_uri(self.settings.model_uri)
                loaded = self._load(self._resolve())
            except Exception as exc:
                failure = classify_failure(exc)
                self.last_error = str(failure)
                logger.warning("model %s not loaded: %s", self.settings.model_uri, failure)
                loaded = self._load_cached(registry_error=str(failure))
                if loaded is None:
                    return None
            self.current = loaded
            if loaded.record.source == "registry":
                self._write_cache(loaded)
            return loaded

    def reload(self) -> ReloadOutcome:
        """Load the alias's current version; keep serving the old model if it fails."""
        with self._lock:
            previous = self.current
            previous_version = previous.record.version if previous is not None else None
            try:
                if self.spec is None:
                    self.spec = parse_model_uri(self.settings.model_uri)
                target = self._resolve()
                if (
                    previous is not None
                    and previous.record.source == "registry"
                    and target.version is not None
                    and target.version == previous.record.version
                ):
                    return ReloadOutcome(
                        "unchanged",
                        f"version {target.version} is already being served",
                        previous_version,
                        previous.record,
                    )
                loaded = self._load(target)
            except Exception as exc:
                failure = classify_failure(exc)
                self.last_error = str(failure)
                kept = f"; still serving version {previous_version}" if previous else ""
                logger.warning("reload refused (%s): %s%s", failure.kind, failure, kept)
                return ReloadOutcome(
                    failure.kind,
                    f"{failure}{kept}",
                    previous_version,
                    previous.record if previous else None,
                )
            self.current = loaded
            self.last_error = None
            if loaded.record.source == "registry":
                self._write_cache(loaded)
            logger.info(
                "now serving %s version %s (was %s)",
                loaded.record.name,
                loaded.record.version,
                previous_version,
            )
            return ReloadOutcome(
                "loaded",
                f"now serving version {loaded.record.version}",
                previous_version,
                loaded.record,
            )

    def check_for_update(self) -> ReloadOutcome | None:
        """Reload when the alias points at another version (or the cache is being served)."""
        spec = self.spec
        current = self.current
        if spec is None or spec.alias is None:
            return self.reload() if current is None else None
        try:
            target = self._resolve()
        except Exception as exc:
            failure = classify_failure(exc)
            self.last_error = str(failure)
            logger.info("model poll: %s", failure)
            return None
        if (
            current is not None
            and current.record.source == "registry"
            and current.record.version == target.version
        ):
            return None
        return self.reload()

    # --- loading ------------------------------------------------------------------------------

    def _resolve(self) -> _Resolved:
        spec = self.spec
        assert spec is not None
        if spec.path is not None:
            return _Resolved(version=None, run_id=None, load_uri=str(spec.path))
        if spec.alias is None:
            return _Resolved(
                version=spec.version, run_id=None, load_uri=f"models:/{spec.name}/{spec.version}"
            )
        from mlflow.tracking import MlflowClient

        version = MlflowClient().get_model_version_by_alias(spec.name, spec.alias)
        return _Resolved(
            version=str(version.version),
            run_id=version.run_id,
            load_uri=f"models:/{spec.name}/{version.version}",
        )

    def _load(self, target: _Resolved) -> LoadedModel:
        spec = self.spec
        assert spec is not None
        if spec.path is not None:
            check_booster_files(spec.path)
            model = RiskModel.load(spec.path)
            source: ModelSource = "local_path"
        else:
            model = self._load_from_uri(target.load_uri)
            source = "registry"
        return self._checked(model, spec, target.version, target.run_id, source, None)

    def _checked(
        self,
        model: RiskModel,
        spec: ModelSpec,
        version: str | None,
        run_id: str | None,
        source: ModelSource,
        registry_error: str | None,
    ) -> LoadedModel:
        """Refuse a model this code cannot score with, or whose routes disagree on the probes."""
        if model.feature_version != FEATURE_VERSION:
            raise ModelLoadError(
                "refused",
                f"the model has feature version {model.feature_version!r}, "
                f"this service builds {FEATURE_VERSION!r}",
            )
        scorer = ModelScorer(model, fast_path=self.settings.fast_path)
        jobs, as_of = build_probe_jobs(model)
        try:
            scorer.check_fast_path(jobs, as_of)
        except RoutesDisagree as exc:
            raise ModelLoadError(
                "refused", f"the service's route and the batch's disagree on a probe: {exc}"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                "refused", f"the model cannot score the probe requests: {short_error(exc)}"
            ) from exc
        metadata = model.metadata or {}
        record = ModelRecord(
            name=spec.name,
            version=version,
            alias=spec.alias,
            uri=spec.uri,
            source=source,
            feature_version=str(model.feature_version),
            run_id=run_id,
            training_period=_string_dict(metadata.get("training_period")),
            holdout_metrics=_float_dict(metadata.get("holdout_metrics")),
            loaded_at=_now_iso(),
            registry_error=registry_error,
            scoring_path=scorer.path,
            fast_path_note=scorer.fast_path_note,
        )
        logger.info("model %s version %s checked (%s path)", spec.name, version, scorer.path)
        return LoadedModel(record=record, scorer=scorer)

    # --- the local cache ----------------------------------------------------------------------

    def _cache_root(self) -> Path | None:
        spec = self.spec
        if spec is None or spec.path is not None:
            return None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", spec.name)
        return self.settings.model_cache_dir / safe

    def _write_cache(self, loaded: LoadedModel) -> None:
        """Keep ``loaded`` as the last good model; a failure here never stops serving."""
        root = self._cache_root()
        if root is None:
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
            loaded.model.save(incoming / "model")
            directory = f"v{loaded.record.version}-{uuid.uuid4().hex[:8]}"
            os.replace(incoming, root / directory)
            pointer = {
                "directory": directory,
                "name": loaded.record.name,
                "version": loaded.record.version,
                "alias": loaded.record.alias,
                "run_id": loaded.record.run_id,
                "cached_at": _now_iso(),
            }
            partial = root / f".{_POINTER}.{uuid.uuid4().hex[:8]}"
            partial.write_text(json.dumps(pointer, indent=2), encoding="utf-8")
            os.replace(partial, root / _POINTER)
            for other in root.iterdir():
                if other.name not in (directory, _POINTER) and other.is_dir():
                    shutil.rmtree(other, ignore_errors=True)
        except OSError as exc:
            logger.warning("could not cache the model in %s: %s", root, exc.strerror or exc)

    def _load_cached(self, registry_error: str) -> LoadedModel | None:
        root = self._cache_root()
        spec = self.spec
        if root is None or spec is None:
            return None
        try:
            pointer: dict[str, Any] = json.loads((root / _POINTER).read_text(encoding="utf-8"))
            cached = root / str(pointer["directory"]) / "model"
            check_booster_files(cached)
            model = RiskModel.load(cached)
            loaded = self._checked(
                model,
                spec,
                pointer.get("version"),
                pointer.get("run_id"),
                "local_cache",
                registry_error,
            )
        except FileNotFoundError:
            logger.warning("no cached model in %s", root)
            return None
        except Exception as exc:
            logger.warning("the cached model in %s cannot be used: %s", root, short_error(exc))
            return None
        logger.warning(
            "serving the cached %s version %s: %s",
            spec.name,
            loaded.record.version,
            registry_error,
        )
        return replace(loaded, record=replace(loaded.record, registry_error=registry_error))


def _string_dict(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def _float_dict(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    out = {}
    for key, number in value.items():
        try:
            out[str(key)] = float(number)
        except (TypeError, ValueError):
            continue
    return out
