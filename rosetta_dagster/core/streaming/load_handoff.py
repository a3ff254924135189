"""The initial load hand-off: what the stream does not cover yet is copied under a slot's
snapshot, and the stream takes over exactly where each snapshot ends (fences)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rosetta_dagster.core.capture import PositionStore
from rosetta_dagster.core.initial_load import InitialLoader, TableLoadReport
from rosetta_dagster.core.load_fences import LoadState, SnapshotVisibility
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.replication import Log
from rosetta_dagster.core.table_schema import TableSchema


def load_uncovered_tables(
    pipeline: PipelineDefinition, positions: PositionStore,
    schemas: dict[TableRef, TableSchema], *, created: set[TableRef], log: Log,
    on_table_loaded: Callable[[TableLoadReport], None], on_wait: Callable[[], None],
    request_backfills: Callable[[Sequence[TableRef], str], None],
) -> dict[TableRef, SnapshotVisibility]:
    """Copy every table when there is no position (first start, dropped slot, interrupted
    load), else the tables added since the last run. Returns the fences: per table loaded under
    a temporary slot, the transactions its snapshot saw (the stream skips them).

    ``created``: tables whose destination table was just created; one already streamed (a new
    target, or dropped on the destination) is loaded by a backfill, not a snapshot."""
    stored = positions.read()
    loader = InitialLoader(pipeline, schemas, log=log, on_table_loaded=on_table_loaded,
                           on_wait=on_wait)
    tables = list(pipeline.tables)
    if stored is None:
        log.info("Initial load of pipeline %s: %d table(s) by COPY under the new slot's "
                 "snapshot", pipeline.name, len(tables))
        consistent_lsn = loader.load_with_pipeline_slot(tables)
        # No fences: the stream starts at the slot's consistent point, and the slot decodes
        # exactly the transactions its exported snapshot did not see.
        state = LoadState({t: None for t in tables})
        positions.write_start(consistent_lsn, state)
    else:
        # Streamed before loads were recorded: every configured table is covered.
        state = stored.loads or LoadState({t: None for t in tables})
        for table in set(state.tables) - set(tables):
            del state.tables[table]  # removed: a later re-add loads it again
        added = [t for t in tables if t not in state.tables]
        if added:
            log.info("Initial load of pipeline %s: %s added; loading under a temporary slot's "
                     "snapshot", pipeline.name, ", ".join(t.qualified for t in added))
            fence = loader.load_with_temporary_slot(added)
            state.tables.update({t: fence for t in added})
        state.drop_passed_fences(stored.position)
        positions.write_loads(state)
        request_backfills([t for t in tables if t in created and t not in added],
                          "has a destination table that was just created")
    return {t: f.visibility for t, f in state.tables.items() if f is not None}
