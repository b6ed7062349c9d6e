"""The service's configuration: one typed settings object, read from the environment once.

Every setting has an environment variable ``CANCEL_RISK_<NAME>`` (``CANCEL_RISK_PORT``,
``CANCEL_RISK_MODEL_URI``, ...). The API keys keep the names the operators know:
``CANCEL_RISK_API_KEYS`` (comma-separated scoring keys) and ``CANCEL_RISK_ADMIN_KEY``. The
entry point (``cancel-risk serve``) calls :meth:`ServiceSettings.from_env` and passes the object
down; nothing reads the environment at import time. Keys are ``SecretStr`` so that a settings
object printed into a log shows ``**********``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

ENV_PREFIX = "CANCEL_RISK_"
DEFAULT_MODEL_URI = "models:/cancel-risk@champion"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the variable."""


def default_cache_dir() -> Path:
    """Where the last good model is kept: ``$XDG_CACHE_HOME/cancel-risk`` or ``~/.cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cancel-risk" / "models"


class ServiceSettings(BaseModel):
    """Everything the REST service needs; immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    model_uri: str = Field(
        DEFAULT_MODEL_URI,
        description="models:/<name>@<alias>, models:/<name>/<version>, or a saved model directory.",
    )
    api_keys: tuple[SecretStr, ...] = Field((), description="Keys allowed to score.")
    admin_key: SecretStr | None = Field(None, description="Key for admin routes (and scoring).")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Larger bodies get 413.")
    max_batch_postings: int = Field(1000, ge=1, description="Postings per batch call.")
    model_poll_seconds: float = Field(
        0.0, ge=0, description="Check the alias for a new version this often; 0 turns it off."
    )
    model_cache_dir: Path = Field(default_factory=default_cache_dir)
    registry_timeout_seconds: float = Field(
        10.0, gt=0, description="HTTP timeout of one request to the tracking server."
    )
    registry_max_retries: int = Field(
        1, ge=0, description="Retries of a failed request to the tracking server."
    )
    cors_origins: tuple[str, ...] = Field((), description="Browser origins allowed; none: off.")
    fast_path: bool = Field(
        True, description="Score canonical requests without pandas (parity-checked at load)."
    )
    max_clock_skew_seconds: float = Field(
        3600.0, ge=0, description="How far in the future an as_of may lie (caller clock skew)."
    )
    access_log: bool = Field(False, description="uvicorn's access log (paths and statuses only).")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> ServiceSettings:
        """Settings from ``CANCEL_RISK_*`` variables, then ``overrides`` (e.g. CLI options).

        Raises :class:`SettingsError` naming the variable when a value is unusable.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            variable = ENV_PREFIX + name.upper()
            if variable in environ:
                values[name] = environ[variable]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX}{'.'.join(str(p) for p in error['loc']).upper()}: {error['msg']}"
                for error in exc.errors()
            )
            raise SettingsError(f"invalid service settings: {problems}") from None

    @property
    def auth_configured(self) -> bool:
        return bool(self.api_keys) or self.admin_key is not None
