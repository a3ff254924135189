"""Typed access to the config store tables. Every method borrows one pooled connection.

One class per area (``pipelines``, ``refused``, ``backfills``, ``telemetry``), all on the same
pool; :class:`ConfigStore` is all of them. The records they return are in ``records``.
"""

from __future__ import annotations

from rosetta_dagster.core.config_store.backfills import BackfillRecords
from rosetta_dagster.core.config_store.pipelines import PipelineRecords
from rosetta_dagster.core.config_store.refused import RefusedChangeRecords
from rosetta_dagster.core.config_store.telemetry import TelemetryRecords


class ConfigStore(PipelineRecords, RefusedChangeRecords, BackfillRecords, TelemetryRecords):
    """Repository over the config store, backed by a :class:`ResilientConnectionPool`."""
