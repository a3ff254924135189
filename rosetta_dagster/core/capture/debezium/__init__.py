"""The Debezium engine: the embedded engine in-process, its offsets in a file on this host
(``offset_store: file``) or in the config store (``config_db``, see ``offset_table``).

``<offsets_dir>/<pipeline>.dat`` is the engine's own offsets file (Kafka's file store format)
and ``<pipeline>.loads.json`` lists the tables the stream covers with their load fences.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg2.errors
import psycopg2.extensions

from rosetta_dagster.core.capture import (
    BatchHandler,
    Capture,
    Log,
    PositionStore,
    StoredPosition,
    tells_deliveries,
)
from rosetta_dagster.core.capture.debezium.offsets import (
    StoredOffset,
    parse_offset_value,
    start_offset_value,
)
from rosetta_dagster.core.capture.debezium.values import DEBEZIUM_VALUES
from rosetta_dagster.core.errors import DatabaseConnectionError
from rosetta_dagster.core.load_fences import LoadState
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, TableRef
from rosetta_dagster.core.position_tracking import PositionTracking
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.settings import config_database_url


def _import_jpype_without_numpy() -> None:
    """JPype's native module imports numpy when it can, for numpy arrays this engine never
    passes: 15 MB of a Debezium stream's idle RSS (numpy's modules and OpenBLAS). Imported
    first, with numpy unavailable for that one import, unless the process has numpy already
    (a warehouse destination's pandas) or JPype. Submodules import jpype after this runs."""
    if "numpy" in sys.modules or "_jpype" in sys.modules:
        return
    sys.modules["numpy"] = None  # type: ignore[assignment]  # import numpy: ImportError
    try:
        import _jpype  # noqa: F401
    finally:
        del sys.modules["numpy"]


_import_jpype_without_numpy()

if TYPE_CHECKING:
    from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable


def offsets_file(offsets_dir: Path, pipeline: str) -> Path:
    return offsets_dir / f"{pipeline}.dat"


def load_state_file(offsets_dir: Path, pipeline: str) -> Path:
    return offsets_dir / f"{pipeline}.loads.json"


class DebeziumOffsets:
    """What both offset stores share: the engine's offset value (its JSON) beside the load
    state, and a position carried over from the other store after ``offset_store`` changed.
    Subclasses say where the value and the load state are kept."""

    pipeline: PipelineDefinition

    @property
    def location(self) -> str:
        raise NotImplementedError

    def value(self) -> bytes | None:
        raise NotImplementedError

    def write_value(self, value: bytes) -> None:
        raise NotImplementedError

    def loads(self) -> LoadState | None:
        raise NotImplementedError

    def write_loads(self, loads: LoadState) -> None:
        raise NotImplementedError

    def release(self) -> str | None:
        """Give the position up once another store took it over; where it is kept, if it is."""
        raise NotImplementedError

    def forget(self) -> bool:
        """Remove the stored offset; True when there was one."""
        raise NotImplementedError

    @property
    def deleting_line(self) -> str:
        raise NotImplementedError

    def delete(self, log: Log) -> bool:
        """The checklist's two lines around the deletion."""
        log.warning("%s", self.deleting_line)
        deleted = self.forget()
        log.warning("Deleted stale offset. Debezium will start fresh with snapshot mode.")
        return deleted

    def offset(self) -> StoredOffset | None:
        value = self.value()
        return None if value is None else parse_offset_value(value)

    def exists(self) -> bool:
        return self.value() is not None

    def read(self) -> StoredPosition | None:
        offset = self.offset()
        if offset is None:
            return None
        position = offset.position
        return StoredPosition(position if position is not None else 0, self.loads())

    def write_start(self, lsn: int, loads: LoadState) -> None:
        self.write_loads(loads)
        self.write_value(start_offset_value(lsn))  # last: the offset marks the load complete

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        offset = self.offset()
        return None if offset is None else offset.behind_slot(slot_confirmed_lsn)

    def tracking(self, destination: Destination) -> PositionTracking | None:
        return None  # the engine commits its own offsets after each batch

    def resumes_after(self) -> str | None:
        from rosetta_dagster.core.capture.debezium.offsets import record_identity

        value = self.value()
        return None if value is None else record_identity(json.loads(value.decode()))

    def take_over(self, other: DebeziumOffsets, log: Log) -> None:
        """Carry ``other``'s position over (once: ``other`` gives it up), logged: switching
        stores is never a silent re-snapshot."""
        value = other.value()
        if value is None:
            return
        loads = other.loads()
        if loads is not None:
            self.write_loads(loads)
        self.write_value(value)
        kept = other.release()
        log.warning("Pipeline %s: moved its Debezium offset from %s to %s (offset_store: %s)%s",
                    self.pipeline.name, other.location, self.location,
                    self.pipeline.settings.offset_store, f"; {kept}" if kept else "")


@dataclass
class OffsetFile(DebeziumOffsets):
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

    def exists(self) -> bool:
        return self.path.exists()  # without reading it (no JVM)

    def value(self) -> bytes | None:
        from rosetta_dagster.core.capture.debezium.offsets import read_offset_value

        return read_offset_value(self.path, self.pipeline)

    def write_value(self, value: bytes) -> None:
        from rosetta_dagster.core.capture.debezium.offsets import write_offset_value

        write_offset_value(self.path, self.pipeline, value)

    def loads(self) -> LoadState | None:
        if not self.loads_path.exists():
            return None
        return LoadState.from_document(json.loads(self.loads_path.read_text()))

    def write_loads(self, loads: LoadState) -> None:
        self.loads_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.loads_path.with_name(self.loads_path.name + ".partial")
        partial.write_text(json.dumps(loads.document(), indent=1))
        os.replace(partial, self.loads_path)

    def forget(self) -> bool:
        if not self.path.exists():
            return False
        self.path.unlink(missing_ok=True)
        return True

    def release(self) -> str:
        """Renamed, kept for reference and no longer read."""
        kept = self.path.with_name(self.path.name + ".moved-to-config-db")
        os.replace(self.path, kept)
        if self.loads_path.exists():
            os.replace(self.loads_path, self.loads_path.with_name(
                self.loads_path.name + ".moved-to-config-db"))
        return f"the file is kept as {kept}"

    def engine_properties(self) -> dict[str, str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return {"offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
                "offset.storage.file.filename": str(self.path)}

    def prepare(self, log: Log) -> None:
        """Take over a position kept in config_db (a pipeline switched back to ``file``)."""
        from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable

        url = config_database_url()
        if url is None or self.path.exists():
            return
        try:
            self.take_over(OffsetTable(self.pipeline, url, self), log)
        except (DatabaseConnectionError, psycopg2.errors.UndefinedTable):
            return  # no config store here, or one without Rosetta's tables: nothing to carry


class DebeziumEngine:
    name = "debezium"
    values = DEBEZIUM_VALUES
    applies_once = False  # it resumes from its offset, saved apart from the destinations

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
        start: int | None,
    ) -> Capture:
        """Resumes from its own offsets (``start`` is for engines that keep positions in the
        destinations). Without an offset it snapshots as ``snapshot_mode`` says, unless the
        initial load copied the tables already (``initial_load: copy``)."""
        from rosetta_dagster.core.capture.debezium.engine import DebeziumCapture
        from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable
        from rosetta_dagster.core.capture.reread import SourceReread
        from rosetta_dagster.core.replication import read_source_schema

        assert isinstance(positions, OffsetFile | OffsetTable)
        from rosetta_dagster.core.capture.debezium.type_watch import TypeWatch

        copied = pipeline.settings.initial_load == "copy"
        return DebeziumCapture(pipeline, positions.engine_properties(), on_batch,
                               snapshot_mode="no_data" if copied else None,
                               reread=SourceReread(
                                   schemas, DEBEZIUM_VALUES,
                                   read_schema=lambda t: read_source_schema(pipeline, t)),
                               type_watch=TypeWatch(schemas),
                               deliveries=tells_deliveries(self, schemas))


DEBEZIUM = DebeziumEngine()
