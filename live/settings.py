"""The live mode's settings: the service's own, and the book, the push endpoint and the alerts.

Read from ``CANCEL_RISK_*`` variables like the service's (:class:`serving.settings.ServiceSettings`,
whose fields this class extends): ``CANCEL_RISK_DB_URL``, ``CANCEL_RISK_PUSH_PATH``,
``CANCEL_RISK_PUSH_SECRET``, ``CANCEL_RISK_PUSH_ALLOWED_NETS``, ``CANCEL_RISK_SWEEP_SECONDS``,
``CANCEL_RISK_ALERT_LEVEL``, ``CANCEL_RISK_ALERT_STEP``, ``CANCEL_RISK_ALERT_CHANNELS``,
``CANCEL_RISK_CLOCK``, ...
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from serving.settings import ServiceSettings

# Ozon's published sources of push notifications (the push_start section of its API document).
OZON_PUSH_NETS = ("195.34.21.0/24", "185.73.192.0/22", "91.223.93.0/24")


def default_db_url() -> str:
    """``$XDG_DATA_HOME/cancel-risk/book.db`` (``~/.local/share`` by default), as SQLite."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite:///{Path(base) / 'cancel-risk' / 'book.db'}"


class LiveSettings(ServiceSettings):
    """The service's settings plus the live mode's."""

    live: bool = Field(False, description="Run the live order book (push endpoint, re-scoring).")
    db_url: SecretStr = Field(
        default_factory=lambda: SecretStr(default_db_url()),
        description="The book's database: sqlite:///path (default) or postgresql://...",
    )
    push_path: str = Field("/v1/ozon/push", pattern=r"^/[A-Za-z0-9_\-/{}.]*$")
    push_secret: SecretStr | None = Field(
        None,
        description="Shared secret: the last path segment of the push URL, or the "
        "X-Push-Secret header. None: no secret asked.",
    )
    push_allowed_nets: tuple[str, ...] = Field(
        (), description="Source networks allowed to push ('ozon': Ozon's published ones)."
    )
    trust_forwarded_for: bool = Field(
        False, description="Take the client address from X-Forwarded-For (behind a proxy)."
    )
    worker: bool = Field(
        True,
        description="Run the re-scoring worker beside the server (false: `cancel-risk worker` "
        "runs it elsewhere, on the same book).",
    )
    sweep_seconds: float = Field(
        3600.0, gt=0, description="Re-score every open posting this often."
    )
    rescore_interval_seconds: float = Field(
        0.2, gt=0, description="How often the worker looks for postings to re-score."
    )
    rescore_batch: int = Field(256, ge=1, description="Postings re-scored together.")
    alert_level: Literal["low", "medium", "high"] = "high"
    alert_step: float = Field(0.0, ge=0, lt=1, description="Alert on each rise by this much.")
    alert_channels: str = Field(
        "", description="JSON list of alert channels (see live.alerts); empty: no alerts."
    )
    clock: Literal["wall", "events"] = Field(
        "wall",
        description="'wall': score at the present moment; 'events': at the book's latest "
        "record time (replays of an archive).",
    )
    public_url: str | None = Field(None, description="The service's address as sellers reach it.")
    causes_seconds: float = Field(
        3600.0,
        gt=0,
        description="Recompute the dashboard's cause analysis after a sweep when the last one "
        "is older than this (in the book's clock).",
    )
    ui: bool = Field(True, description="Serve the seller dashboard at /ui.")
    ui_session_hours: float = Field(
        12.0, gt=0, le=24 * 30, description="How long a dashboard login lasts."
    )
    ui_session_secret: SecretStr | None = Field(
        None,
        description="Signs the dashboard's session cookies; None: a random one per start "
        "(sessions end when the service restarts).",
    )
    ui_refresh_seconds: float = Field(
        15.0, gt=0, description="How often an open dashboard page refreshes its table."
    )

    @field_validator("push_allowed_nets", mode="before")
    @classmethod
    def _split_nets(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        expanded: list[str] = []
        for net in value:
            expanded.extend(OZON_PUSH_NETS if net == "ozon" else (net,))
        for net in expanded:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad network
        return tuple(expanded)

    @field_validator("push_secret", mode="before")
    @classmethod
    def _empty_secret(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value
