"""A pipeline's position row in a PostgreSQL destination (``<schema>._rosetta_positions``): the
position the destination has committed and the load state (see ``capture.pgoutput.positions``)."""

from __future__ import annotations

from typing import Any

from psycopg2 import sql
from psycopg2.extras import Json

from rosetta_dagster.core.destination.postgres.ddl import table_exists
from rosetta_dagster.core.events import format_lsn
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.replication import destination_connection

POSITIONS_TABLE = "_rosetta_positions"


class PostgresPositionRow:
    def __init__(self, pipeline: PipelineDefinition, destination: Destination) -> None:
        self.pipeline = pipeline
        self.destination = destination
        self.table = sql.Identifier(destination.schema, POSITIONS_TABLE)

    def read(self) -> tuple[int, dict[str, Any]] | None:
        with destination_connection(self.pipeline, self.destination) as conn, \
                conn.cursor() as cursor:
            if not table_exists(cursor, self.table):
                return None
            cursor.execute(sql.SQL(
                "SELECT position - '0/0'::pg_lsn, loads FROM {} WHERE pipeline = %s"
            ).format(self.table), (self.pipeline.name,))
            row = cursor.fetchone()
            return None if row is None else (int(row[0]), row[1])

    def write_start(self, slot_name: str, lsn: int, loads: dict[str, Any]) -> None:
        with destination_connection(self.pipeline, self.destination) as conn, \
                conn.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(self.destination.schema)))
            cursor.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (pipeline text PRIMARY KEY, slot_name text NOT NULL, "
                "position pg_lsn NOT NULL, loads jsonb NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())").format(self.table))
            cursor.execute(sql.SQL(
                "INSERT INTO {} (pipeline, slot_name, position, loads) "
                "VALUES (%s, %s, %s::pg_lsn, %s) ON CONFLICT (pipeline) DO UPDATE SET "
                "slot_name = excluded.slot_name, position = excluded.position, "
                "loads = excluded.loads, updated_at = now()"
            ).format(self.table), (self.pipeline.name, slot_name, format_lsn(lsn), Json(loads)))

    def write_loads(self, loads: dict[str, Any]) -> None:
        with destination_connection(self.pipeline, self.destination) as conn, \
                conn.cursor() as cursor:
            cursor.execute(sql.SQL("UPDATE {} SET loads = %s WHERE pipeline = %s").format(
                self.table), (Json(loads), self.pipeline.name))

    def delete(self) -> bool:
        with destination_connection(self.pipeline, self.destination) as conn, \
                conn.cursor() as cursor:
            if not table_exists(cursor, self.table):
                return False
            cursor.execute(sql.SQL("DELETE FROM {} WHERE pipeline = %s").format(self.table),
                           (self.pipeline.name,))
            return cursor.rowcount > 0
