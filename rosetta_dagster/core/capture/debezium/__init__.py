"""The Debezium engine: the embedded engine in-process, its offsets in a file on this host.

``<offsets_dir>/<pipeline>.dat`` is the engine's own offsets file (Kafka's file store format)
and ``<pipeline>.loads.json`` lists the tables the stream covers with their load fences.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg2.extensions

from rosetta_dagster.core.apply.applier import PositionTracking
from rosetta_dagster.core.apply.schema import TableSchema
from rosetta_dagster.core.capture import BatchHandler, Capture, PositionStore, StoredPosition
from rosetta_dagster.core.capture.debezium.values import DEBEZIUM_VALUES
from rosetta_dagster.core.initial_load import LoadState
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef


def offsets_file(offsets_dir: Path, pipeline: str) -> Path:
    return offsets_dir / f"{pipeline}.dat"


def load_state_file(offsets_dir: Path, pipeline: str) -> Path:
    return offsets_dir / f"{pipeline}.loads.json"


@dataclass
class OffsetFile:
    """The engine's offsets file (the marker of a completed load) and the load state beside it."""

    pipeline: PipelineDefinition
    path: Path
    loads_path: Path

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def deleting_line(self) -> str:
        return f"Deleting stale offset file: {self.path}"

    @property
    def deleted_line(self) -> str:
        return "Deleted stale offset. Debezium will start fresh with snapshot mode."

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> StoredPosition | None:
        from rosetta_dagster.core.capture.debezium.offsets import read_offset

        if not self.path.exists():
            return None
        offset = read_offset(self.path, self.pipeline)
        loads = None
        if self.loads_path.exists():
            loads = LoadState.from_document(json.loads(self.loads_path.read_text()))
        position = offset.position if offset is not None else None
        return StoredPosition(position if position is not None else 0, loads)

    def write_start(self, lsn: int, loads: LoadState) -> None:
        from rosetta_dagster.core.capture.debezium.offsets import write_start_offset

        self.write_loads(loads)
        # Last: the offset is what marks the load complete.
        write_start_offset(self.path, self.pipeline, lsn)

    def write_loads(self, loads: LoadState) -> None:
        self.loads_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.loads_path.with_name(self.loads_path.name + ".partial")
        partial.write_text(json.dumps(loads.document(), indent=1))
        os.replace(partial, self.loads_path)

    def delete(self) -> bool:
        if not self.path.exists():
            return False
        self.path.unlink(missing_ok=True)
        return True

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        """Debezium's own stale-offset check needs a processed position, which an offset
        written at a load's consistent point lacks: that one is compared here. (Offsets the
        engine wrote are left to the engine's check.)"""
        from rosetta_dagster.core.capture.debezium.offsets import read_offset

        offset = read_offset(self.path, self.pipeline)
        if offset is None or offset.processed_lsn is not None or offset.lsn is None:
            return None
        return offset.lsn if slot_confirmed_lsn > offset.lsn else None

    def tracking(self, destination: Destination) -> PositionTracking | None:
        return None  # the engine commits its own offsets after each batch


class DebeziumEngine:
    name = "debezium"
    values = DEBEZIUM_VALUES

    def source_refusal(self, conn: psycopg2.extensions.connection) -> str | None:
        """Debezium's type registry fails when it starts (a NullPointerException) on a database
        that holds a domain over an enum, whether a captured table uses it or not."""
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT format_type(d.oid, NULL) FROM pg_type d JOIN pg_type b "
                "ON b.oid = d.typbasetype WHERE d.typtype = 'd' AND b.typtype = 'e' ORDER BY 1")
            domains = [row[0] for row in cursor.fetchall()]
        if not domains:
            return None
        return (f"the source database has domains over enums ({', '.join(domains)}), on which "
                "Debezium fails when it starts; the pgoutput engine streams it "
                "(streaming.engine: pgoutput)")

    def position_store(self, pipeline: PipelineDefinition, offsets_dir: Path) -> PositionStore:
        return OffsetFile(pipeline, offsets_file(offsets_dir, pipeline.name),
                          load_state_file(offsets_dir, pipeline.name))

    def capture(
        self,
        pipeline: PipelineDefinition,
        positions: PositionStore,
        on_batch: BatchHandler,
        *,
        schemas: Mapping[TableRef, TableSchema],
        start_position: int | None,
        snapshot_mode: str | None,
    ) -> Capture:
        from rosetta_dagster.core.capture.debezium.engine import DebeziumCapture
        from rosetta_dagster.core.capture.debezium.reread import SourceReread

        assert isinstance(positions, OffsetFile)
        return DebeziumCapture(pipeline, positions.path, on_batch, snapshot_mode=snapshot_mode,
                               reread=SourceReread(schemas))


DEBEZIUM = DebeziumEngine()
