"""Runtime settings from the environment (prefix CDC_AUDIT_) and command-line overrides."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDC_AUDIT_", extra="ignore")

    dsn: str | None = None
    policy: Path | None = None
    signing_key_file: Path | None = None
    redaction_key_file: Path | None = None
    metrics_port: int | None = None
    batch_messages: int = Field(5000, gt=0)
    """Replication messages the worker reads before writing a batch (bounds its memory)."""
    jobs_every_seconds: float | None = Field(None, gt=0)
    """Run every scheduled job at this interval instead of its cron schedule (trying out)."""
    heartbeat_seconds: float = Field(10.0, gt=0)
    """Idle time after which the worker commits a marker so the slot keeps advancing."""
    ready_max_lag_seconds: float = Field(60.0, ge=0)
    """`/readyz` answers 503 while the worker's sealing lag is above this many seconds."""
