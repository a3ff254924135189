"""Environment-driven settings shared by the CLI and the Dagster layer."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DATABASE_URL_ENV = "CONFIG_DATABASE_URL"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def config_database_url() -> str | None:
    return os.environ.get(CONFIG_DATABASE_URL_ENV)


def local_state_dir() -> Path:
    """Where the local demo keeps its PostgreSQL cluster and Dagster home (git-ignored)."""
    return Path(os.environ.get("ROSETTA_LOCAL_DIR", PROJECT_ROOT / "tmp" / "local")).resolve()


def offsets_dir() -> Path:
    """Debezium offset files live here as ``<pipeline>.dat`` (relative paths: the run's cwd)."""
    return Path(os.environ.get("ROSETTA_OFFSETS_DIR", "tmp/offsets"))
