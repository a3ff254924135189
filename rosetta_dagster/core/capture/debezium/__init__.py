"""The Debezium engine: the embedded engine in-process, its offsets in a file on this host
(``offset_store: file``) or in the config store (``config_db``, see ``offset_table``).

``<offsets_dir>/<pipeline>.dat`` is the engine's own offsets file (Kafka's file store format)
and ``<pipeline>.loads.json`` lists the tables the stream covers with their load fences.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2.errors
import psycopg2.extensions

from rosetta_dagster.core.apply.applier import PositionTracking
from rosetta_dagster.core.apply.schema import TableSchema
from rosetta_dagster.core.capture import BatchHandler, Capture, Log, PositionStore, StoredPosition
from rosetta_dagster.core.capture.debezium.values import DEBEZIUM_VALUES
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.initial_load import LoadState
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef
from rosetta_dagster.settings import config_database_url

if TYPE_CHECKING:
    from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable


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

    def value(self) -> bytes | None:
        from rosetta_dagster.core.capture.debezium.offsets import read_offset_value

        return read_offset_value(self.path, self.pipeline)

    def loads(self) -> LoadState | None:
        if not self.loads_path.exists():
            return None
        return LoadState.from_document(json.loads(self.loads_path.read_text()))

    def read(self) -> StoredPosition | None:
        from rosetta_dagster.core.capture.debezium.offsets import parse_offset_value

        value = self.value()
        if value is None:
            return None
        position = parse_offset_value(value).position
        return StoredPosition(position if position is not None else 0, self.loads())

    def write_value(self, value: bytes) -> None:
        from rosetta_dagster.core.capture.debezium.offsets import write_offset_value

        write_offset_value(self.path, self.pipeline, value)

    def write_start(self, lsn: int, loads: LoadState) -> None:
        from rosetta_dagster.core.capture.debezium.offsets import start_offset_value

        self.write_loads(loads)
        self.write_value(start_offset_value(lsn))  # last: the offset marks the load complete

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

    def retire(self) -> Path:
        """After its position moved to config_db: renamed (kept, no longer read)."""
        kept = self.path.with_name(self.path.name + ".moved-to-config-db")
        os.replace(self.path, kept)
        if self.loads_path.exists():
            os.replace(self.loads_path, self.loads_path.with_name(
                self.loads_path.name + ".moved-to-config-db"))
        return kept

    def engine_properties(self) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return {"offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
                "offset.storage.file.filename": str(self.path)}

    def prepare(self, log: Log) -> None:
        """Carry a position kept in config_db over once (a pipeline switched back from
        ``config_db``): never a silent re-snapshot."""
        from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable

        url = config_database_url()
        if url is None or self.path.exists():
            return
        table = OffsetTable(self.pipeline, url, self)
        try:
            value = table.value()
            loads = table.loads()
        except (DatabaseConnectionError, psycopg2.errors.UndefinedTable):
            return  # no config store here, or one without Rosetta's tables: nothing to carry
        if value is None:
            return
        if loads is not None:
            self.write_loads(loads)
        self.write_value(value)
        table.delete()
        log.warning("Pipeline %s: moved its Debezium offset from %s to %s (offset_store: file)",
                    self.pipeline.name, table.location, self.location)

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        from rosetta_dagster.core.capture.debezium.offsets import read_offset

        offset = read_offset(self.path, self.pipeline)
        return None if offset is None else offset.behind_slot(slot_confirmed_lsn)

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

    def position_store(self, pipeline: PipelineDefinition, offsets_dir: Path
                       ) -> OffsetFile | OffsetTable:
        file = OffsetFile(pipeline, offsets_file(offsets_dir, pipeline.name),
                          load_state_file(offsets_dir, pipeline.name))
        if pipeline.settings.offset_store == "config_db":
            from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable

            return OffsetTable(pipeline, config_database_url(), file)
        return file

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
        from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable
        from rosetta_dagster.core.capture.debezium.reread import SourceReread

        assert isinstance(positions, OffsetFile | OffsetTable)
        return DebeziumCapture(pipeline, positions.engine_properties(), on_batch,
                               snapshot_mode=snapshot_mode, reread=SourceReread(schemas))


DEBEZIUM = DebeziumEngine()
