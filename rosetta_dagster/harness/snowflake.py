"""The Snowflake destination's tests against fakesnow: an emulator of Snowflake's SQL on DuckDB,
served over Snowflake's HTTP protocol to the real connector (not Snowflake itself). The
fixtures are in the tests' conftest; here: reading the emulated tables back as PostgreSQL
text and comparing them with the source."""

from __future__ import annotations

import dataclasses
from typing import Any

from rosetta_dagster.core.destination.snowflake.connection import cursor
from rosetta_dagster.core.destination.snowflake.statements import IN_SCHEMA, in_schema, quote
from rosetta_dagster.core.destination.snowflake.types import snow_type
from rosetta_dagster.core.destination.warehouse.reader import row_text
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.harness import StreamingEnv, wait_until
from rosetta_dagster.harness.type_matrix import row_differences


def snowflake_pipeline(env: StreamingEnv, destination: Destination, name: str,
                       tables: list[str]) -> PipelineDefinition:
    return dataclasses.replace(env.pipeline(name, tables), destinations=(destination,))


def existing_tables(cur: Any, destination: Destination) -> set[str]:
    return {row[0] for row in cur.execute(
        f"SELECT table_name FROM information_schema.tables WHERE {IN_SCHEMA}",  # noqa: S608
        in_schema(destination.schema)).fetchall()}


def snowflake_rows(cur: Any, destination: Destination, schema: TableSchema,
                   existing: set[str] | None = None) -> list[tuple[int, str]]:
    """``(id, row as PostgreSQL text)`` of the Snowflake table in key order ([] before it
    exists; ``existing``: the schema's tables, when known)."""
    renders = [snow_type(c).render for c in schema.columns]
    if schema.table.name not in (existing_tables(cur, destination) if existing is None
                                 else existing):
        return []
    names = ", ".join(quote(c.name) for c in schema.columns)
    try:
        rows = cur.execute(f"SELECT {names} FROM {quote(destination.schema, schema.table.name)} "  # noqa: S608
                           'ORDER BY "id"').fetchall()
    except Exception as exc:  # a column the destination lacks yet
        return [(0, f"unreadable: {str(exc).splitlines()[0]}")]
    return [(int(row[0]), row_text([None if v is None else render(v)
                                    for render, v in zip(renders, row, strict=True)]))
            for row in rows]


def snowflake_differences(env: StreamingEnv, destination: Destination,
                          schemas: list[TableSchema], *, first_table_only: bool = False
                          ) -> list[str]:
    with cursor(destination) as cur:
        existing = existing_tables(cur, destination)
        return row_differences(env, schemas,
                               lambda schema: snowflake_rows(cur, destination, schema, existing),
                               first_table_only=first_table_only)


def converge(env: StreamingEnv, destination: Destination, schemas: list[TableSchema],
             what: str) -> None:
    """Wait until the destination equals the source, else fail listing what differs."""
    try:
        wait_until(lambda: not snowflake_differences(env, destination, schemas,
                                                     first_table_only=True), 120, what)
    except AssertionError:
        raise AssertionError(f"{what}: Snowflake differs:\n" + "\n".join(
            snowflake_differences(env, destination, schemas)[:40])) from None
