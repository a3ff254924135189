"""The config store (``config_db``): runtime state of pipelines, backfills and monitors."""

from rosetta_dagster.core.config_store.migrations import apply_migrations, load_migrations
from rosetta_dagster.core.config_store.records import (
    ApplySkip,
    BackfillJob,
    BackfillStatus,
    MetricsSnapshot,
    NotificationAttempt,
    OffsetCleanup,
    ParkedEvent,
    ParkedRow,
    Pipeline,
    PipelineFailure,
    PipelineState,
    PipelineStatus,
    PoolUsage,
    WalReading,
)
from rosetta_dagster.core.config_store.repository import ConfigStore

__all__ = [
    "ApplySkip",
    "BackfillJob",
    "BackfillStatus",
    "ConfigStore",
    "MetricsSnapshot",
    "NotificationAttempt",
    "OffsetCleanup",
    "ParkedEvent",
    "ParkedRow",
    "Pipeline",
    "PipelineFailure",
    "PipelineState",
    "PipelineStatus",
    "PoolUsage",
    "WalReading",
    "apply_migrations",
    "load_migrations",
]
