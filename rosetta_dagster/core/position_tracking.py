"""Where a destination records a pipeline's stream position, in the transaction of each batch."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql


@dataclass(frozen=True)
class PositionTracking:
    """A destination table that holds the stream position of a pipeline, updated in the same
    transaction as each batch (engines that keep their position with the data)."""

    pipeline: str
    table: sql.Identifier

    def read(self, cursor: psycopg2.extensions.cursor) -> int | None:
        cursor.execute(sql.SQL("SELECT position - '0/0'::pg_lsn FROM {} WHERE pipeline = %s")
                       .format(self.table), (self.pipeline,))
        row = cursor.fetchone()
        return None if row is None else int(row[0])

    def record(self, cursor: psycopg2.extensions.cursor, position: int) -> None:
        cursor.execute(sql.SQL("UPDATE {} SET position = '0/0'::pg_lsn + %s::numeric, "
                               "updated_at = now() WHERE pipeline = %s").format(self.table),
                       (position, self.pipeline))
