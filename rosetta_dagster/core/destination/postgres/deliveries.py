"""Where a PostgreSQL destination records the last record it took from an engine that delivers
again after a restart (``<schema>._rosetta_deliveries``; see core.streaming.redelivery)."""

from __future__ import annotations

import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.destination.postgres.ddl import table_exists
from rosetta_dagster.core.events import Delivery

DELIVERIES_TABLE = "_rosetta_deliveries"


class DeliveryLog:
    """A pipeline's row in the destination's deliveries table (created on first use)."""

    def __init__(self, pipeline: str, schema: str) -> None:
        self.pipeline = pipeline
        self.table = sql.Identifier(schema, DELIVERIES_TABLE)

    def _create(self, cursor: psycopg2.extensions.cursor) -> None:
        cursor.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (pipeline text PRIMARY KEY, record text NOT NULL, "
            "ordinal integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
        ).format(self.table))

    def read(self, cursor: psycopg2.extensions.cursor) -> Delivery | None:
        self._create(cursor)
        cursor.execute(sql.SQL("SELECT record, ordinal FROM {} WHERE pipeline = %s")
                       .format(self.table), (self.pipeline,))
        row = cursor.fetchone()
        return None if row is None else Delivery(row[0], int(row[1]))

    def record(self, cursor: psycopg2.extensions.cursor, delivery: Delivery) -> None:
        """In the transaction of the batch that took the record."""
        cursor.execute(sql.SQL(
            "INSERT INTO {} (pipeline, record, ordinal) VALUES (%s, %s, %s) ON CONFLICT "
            "(pipeline) DO UPDATE SET record = excluded.record, ordinal = excluded.ordinal, "
            "updated_at = now()").format(self.table),
            (self.pipeline, delivery.record, delivery.ordinal))

    def forget(self, cursor: psycopg2.extensions.cursor) -> None:
        if table_exists(cursor, self.table):
            cursor.execute(sql.SQL("DELETE FROM {} WHERE pipeline = %s").format(self.table),
                           (self.pipeline,))
