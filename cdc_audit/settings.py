"""Runtime settings from the environment (prefix CDC_AUDIT_) and command-line overrides."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDC_AUDIT_", extra="ignore")

    dsn: str | None = None
    policy: Path | None = None
    signing_key_file: Path | None = None
    redaction_key_file: Path | None = None
    metrics_port: int | None = None
