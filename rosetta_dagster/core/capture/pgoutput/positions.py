"""The pgoutput engine's stream position, kept in every destination with the data.

Each destination has a small table of Rosetta's own, ``<schema>._rosetta_positions``, with one
row per pipeline: the position the destination has committed (updated in the same transaction
as every batch) and the tables the stream covers with their load fences. Nothing is kept on
the host that runs the stream, so a stream can start on any machine and resume exactly.
"""

from __future__ import annotations

from psycopg2 import sql
from psycopg2.extras import Json

from rosetta_dagster.core.capture import Log, StoredPosition
from rosetta_dagster.core.events import format_lsn
from rosetta_dagster.core.load_fences import LoadState
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.position_tracking import PositionTracking
from rosetta_dagster.core.replication import destination_connection

POSITIONS_TABLE = "_rosetta_positions"


class DestinationPositions:
    """One position row per destination; the stream resumes from the lowest."""

    def __init__(self, pipeline: PipelineDefinition) -> None:
        self.pipeline = pipeline

    @staticmethod
    def table(destination: Destination) -> sql.Identifier:
        return sql.Identifier(destination.schema, POSITIONS_TABLE)

    @property
    def location(self) -> str:
        return ", ".join(f"{d.name} ({d.schema}.{POSITIONS_TABLE})"
                         for d in self.pipeline.destinations)

    def _ensure(self, destination: Destination) -> None:
        with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(destination.schema)))
            cursor.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (pipeline text PRIMARY KEY, slot_name text NOT NULL, "
                "position pg_lsn NOT NULL, loads jsonb NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(self.table(destination)))

    def read_each(self) -> dict[str, tuple[int, LoadState] | None]:
        """Each destination's committed position and load state (None where it has none)."""
        found: dict[str, tuple[int, LoadState] | None] = {}
        for destination in self.pipeline.destinations:
            with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cursor:
                cursor.execute("SELECT to_regclass(%s)", (self.table(destination).as_string(conn),))
                row = cursor.fetchone()
                if row is None or row[0] is None:
                    found[destination.name] = None
                    continue
                cursor.execute(sql.SQL(
                    "SELECT position - '0/0'::pg_lsn, loads FROM {} WHERE pipeline = %s"
                ).format(self.table(destination)), (self.pipeline.name,))
                row = cursor.fetchone()
                found[destination.name] = None if row is None else (
                    int(row[0]), LoadState.from_document(row[1]))
        return found

    def prepare(self, log: Log) -> None:
        """Nothing to carry over: positions only ever live in the destinations."""

    def exists(self) -> bool:
        return any(found is not None for found in self.read_each().values())

    def read(self) -> StoredPosition | None:
        """The lowest destination position; None unless every destination has one (a load
        interrupted between destinations is loaded again)."""
        each = self.read_each()
        if any(found is None for found in each.values()):
            return None
        lowest = min((found for found in each.values() if found is not None), key=lambda f: f[0])
        return StoredPosition(lowest[0], lowest[1])

    def write_start(self, lsn: int, loads: LoadState) -> None:
        for destination in self.pipeline.destinations:
            self._ensure(destination)
            with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cursor:
                cursor.execute(sql.SQL(
                    "INSERT INTO {} (pipeline, slot_name, position, loads) "
                    "VALUES (%s, %s, %s::pg_lsn, %s) ON CONFLICT (pipeline) DO UPDATE SET "
                    "slot_name = excluded.slot_name, position = excluded.position, "
                    "loads = excluded.loads, updated_at = now()"
                ).format(self.table(destination)), (self.pipeline.name, self.pipeline.slot_name,
                                                    format_lsn(lsn), Json(loads.document())))

    def write_loads(self, loads: LoadState) -> None:
        for destination in self.pipeline.destinations:
            with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cursor:
                cursor.execute(sql.SQL("UPDATE {} SET loads = %s WHERE pipeline = %s").format(
                    self.table(destination)), (Json(loads.document()), self.pipeline.name))

    def delete(self, log: Log) -> bool:
        log.warning("Deleting stale stream positions of pipeline %s in %s", self.pipeline.name,
                    self.location)
        deleted = False
        for destination in self.pipeline.destinations:
            with destination_connection(self.pipeline, destination) as conn, conn.cursor() as cursor:
                cursor.execute("SELECT to_regclass(%s)", (self.table(destination).as_string(conn),))
                row = cursor.fetchone()
                if row is None or row[0] is None:
                    continue
                cursor.execute(sql.SQL("DELETE FROM {} WHERE pipeline = %s").format(
                    self.table(destination)), (self.pipeline.name,))
                deleted = deleted or cursor.rowcount > 0
        log.warning("Deleted stale positions. The stream will start fresh with an initial load.")
        return deleted

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        """Only the lowest destination position is ever confirmed, so a slot past it was
        dropped and re-created (or advanced by hand): the changes in between are gone."""
        stored = self.read()
        if stored is None or slot_confirmed_lsn <= stored.position:
            return None
        return stored.position

    def tracking(self, destination: Destination) -> PositionTracking:
        return PositionTracking(self.pipeline.name, self.table(destination))
