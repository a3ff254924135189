"""The config store (``config_db``): runtime state of pipelines, backfills and monitors."""

from rosetta_dagster.core.config_store.migrations import apply_migrations, load_migrations
from rosetta_dagster.core.config_store.records import (
    BackfillJob,
    BackfillStatus,
    ParkedEvent,
    ParkedRow,
    Pipeline,
    PipelineState,
    PipelineStatus,
)
from rosetta_dagster.core.config_store.repository import ConfigStore

__all__ = [
    "BackfillJob",
    "BackfillStatus",
    "ConfigStore",
    "ParkedEvent",
    "ParkedRow",
    "Pipeline",
    "PipelineState",
    "PipelineStatus",
    "apply_migrations",
    "load_migrations",
]
