"""The config store: changes a destination refused: skips requested, parked changes and their retries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from psycopg2.extras import Json

from rosetta_dagster.core.config_store.base import StoreBase
from rosetta_dagster.core.config_store.records import (
    PARKED_SELECT,
    ApplySkip,
    ParkedEvent,
    ParkedRow,
)
from rosetta_dagster.core.destination.errors import RefusedChange
from rosetta_dagster.core.errors import ConfigStoreError


class RefusedChangeRecords(StoreBase):
    # -- refused changes (core.destination.errors) ------------------------------------------------

    def record_apply_error(self, name: str, report: RefusedChange | None) -> None:
        """The change ``name`` stopped on (None: it streamed past it)."""
        self._query(
            "UPDATE pipeline_metadata m SET last_apply_error = %s, updated_at = now() "
            "FROM pipelines p WHERE p.id = m.pipeline_id AND p.name = %s",
            (Json(report.as_dict()) if report is not None else None, name),
        )

    def request_skip(self, name: str, report: RefusedChange, requested_by: str) -> int:
        rows = self._query(
            """
            INSERT INTO apply_skips (pipeline_id, destination, table_name, key, operation,
                                     position, requested_by)
            SELECT id, %s, %s, %s, %s, %s, %s FROM pipelines WHERE name = %s RETURNING id
            """,
            (report.destination, report.table, Json(report.key), report.operation,
             report.position, requested_by, name),
        )
        if not rows:
            raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
        return int(rows[0]["id"])

    def pending_skips(self, name: str) -> list[ApplySkip]:
        return [ApplySkip.from_row(r) for r in self._query(
            "SELECT s.* FROM apply_skips s JOIN pipelines p ON p.id = s.pipeline_id "
            "WHERE p.name = %s AND s.skipped_at IS NULL ORDER BY s.id", (name,))]

    def list_skips(self, name: str) -> list[ApplySkip]:
        return [ApplySkip.from_row(r) for r in self._query(
            "SELECT s.* FROM apply_skips s JOIN pipelines p ON p.id = s.pipeline_id "
            "WHERE p.name = %s ORDER BY s.id", (name,))]

    def mark_skipped(self, skip_id: int) -> None:
        self._query("UPDATE apply_skips SET skipped_at = now() WHERE id = %s", (skip_id,))

    def park_events(self, name: str, rows: Sequence[ParkedRow]) -> None:
        if not rows:
            return
        with self.pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT id FROM pipelines WHERE name = %s", (name,))
            found = cursor.fetchone()
            if found is None:
                raise ConfigStoreError(f"Pipeline '{name}' does not exist in the config store.")
            cursor.executemany(
                """
                INSERT INTO parked_events (pipeline_id, destination, table_name, key, operation,
                                           position, event, error, sqlstate)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                """,
                [(found[0], r.destination, r.table_name, Json(r.key), r.operation, r.position,
                  Json(r.event), r.error, r.sqlstate) for r in rows],
            )

    def list_parked(self, pipeline: str | None = None, table: str | None = None,
                    retry_requested: bool = False) -> list[ParkedEvent]:
        rows = self._query(
            PARKED_SELECT + " WHERE (%(p)s::text IS NULL OR p.name = %(p)s) "
            "AND (%(t)s::text IS NULL OR e.table_name = %(t)s) "
            "AND (NOT %(r)s OR e.retry_requested_at IS NOT NULL) ORDER BY e.id",
            {"p": pipeline, "t": table, "r": retry_requested},
        )
        return [ParkedEvent.from_row(r) for r in rows]

    def parked_keys(self, name: str) -> list[tuple[str, str, dict[str, Any]]]:
        """``(destination, table, key)`` of every key with parked changes (not the changes)."""
        rows = self._query(
            "SELECT DISTINCT e.destination, e.table_name, e.key FROM parked_events e "
            "JOIN pipelines p ON p.id = e.pipeline_id WHERE p.name = %s", (name,))
        return [(r["destination"], r["table_name"], r["key"]) for r in rows]

    def parked_counts(self) -> list[tuple[str, str, str, int]]:
        """``(pipeline, destination, table, parked events)`` for everything parked."""
        rows = self._query(
            "SELECT p.name, e.destination, e.table_name, count(*) AS n FROM parked_events e "
            "JOIN pipelines p ON p.id = e.pipeline_id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
        return [(r["name"], r["destination"], r["table_name"], int(r["n"])) for r in rows]

    def parked_since(self) -> dict[tuple[str, str, str], tuple[int, datetime]]:
        """``(pipeline, destination, table)`` -> (parked events, when the oldest was parked)."""
        rows = self._query(
            "SELECT p.name, e.destination, e.table_name, count(*) AS n, min(e.created_at) AS since "
            "FROM parked_events e JOIN pipelines p ON p.id = e.pipeline_id GROUP BY 1, 2, 3")
        return {(r["name"], r["destination"], r["table_name"]): (int(r["n"]), r["since"])
                for r in rows}

    def request_parked_retry(self, name: str, table: str | None = None,
                             key: dict[str, Any] | None = None) -> int:
        """Ask the pipeline's stream to replay parked changes (a table's, a key's, or all)."""
        rows = self._query(
            """
            UPDATE parked_events e SET retry_requested_at = now(), updated_at = now()
            FROM pipelines p WHERE p.id = e.pipeline_id AND p.name = %(p)s
              AND (%(t)s::text IS NULL OR e.table_name = %(t)s)
              AND (%(k)s::jsonb IS NULL OR e.key = %(k)s::jsonb)
            RETURNING e.id
            """,
            {"p": name, "t": table, "k": Json(key) if key is not None else None},
        )
        return len(rows)

    def release_parked(self, ids: Sequence[int]) -> None:
        self._query("DELETE FROM parked_events WHERE id = ANY(%s)", (list(ids),))

    def parked_retry_failed(self, ids: Sequence[int], error: str, sqlstate: str | None) -> None:
        self._query(
            "UPDATE parked_events SET attempts = attempts + 1, retry_requested_at = NULL, "
            "error = CASE WHEN id = %(first)s THEN %(error)s ELSE error END, "
            "sqlstate = CASE WHEN id = %(first)s THEN %(sqlstate)s ELSE sqlstate END, "
            "updated_at = now() WHERE id = ANY(%(ids)s)",
            {"ids": list(ids), "first": min(ids), "error": error, "sqlstate": sqlstate},
        )

    def discard_parked(self, name: str, table: str | None = None,
                       key: dict[str, Any] | None = None) -> int:
        rows = self._query(
            """
            DELETE FROM parked_events e USING pipelines p
            WHERE p.id = e.pipeline_id AND p.name = %(p)s
              AND (%(t)s::text IS NULL OR e.table_name = %(t)s)
              AND (%(k)s::jsonb IS NULL OR e.key = %(k)s::jsonb)
            RETURNING e.id
            """,
            {"p": name, "t": table, "k": Json(key) if key is not None else None},
        )
        return len(rows)
