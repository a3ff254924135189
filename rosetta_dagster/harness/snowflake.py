"""The Snowflake destination's tests against fakesnow: an emulator of Snowflake's SQL on DuckDB,
served over Snowflake's HTTP protocol to the real connector (not Snowflake itself). The
fixtures are in the tests' conftest; here: reading the emulated tables back as PostgreSQL
text and comparing them with the source."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rosetta_dagster.core.destination.snowflake.connection import cursor
from rosetta_dagster.core.destination.snowflake.statements import IN_SCHEMA, in_schema, quote
from rosetta_dagster.core.destination.snowflake.types import snow_type
from rosetta_dagster.core.destination.warehouse.reader import row_text
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.harness import (
    StreamingEnv,
    TableComparison,
    differing_rows,
    wait_until_tables_equal,
)
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


def snowflake_comparison(env: StreamingEnv, destination: Destination,
                         schemas: Sequence[TableSchema]) -> TableComparison:
    """``schemas``' tables in Snowflake compared with the source's (see ``wait_until_tables_equal``)."""
    by_name = {schema.table.name: schema for schema in schemas}

    def compare(tables: Sequence[str], first_only: bool) -> dict[str, list[str]]:
        with cursor(destination) as cur:
            existing = existing_tables(cur, destination)
            return row_differences(
                env, [by_name[name] for name in tables],
                lambda schema: snowflake_rows(cur, destination, schema, existing),
                first_only=first_only)

    return compare


def snowflake_differences(env: StreamingEnv, destination: Destination,
                          schemas: Sequence[TableSchema]) -> list[str]:
    """Every row that differs between the source and Snowflake."""
    return differing_rows([s.table.name for s in schemas],
                          snowflake_comparison(env, destination, schemas))


def converge(env: StreamingEnv, destination: Destination, schemas: Sequence[TableSchema],
             what: str, timeout_s: float = 120) -> None:
    """Wait until the destination equals the source, else fail listing what differs."""
    wait_until_tables_equal([s.table.name for s in schemas],
                            snowflake_comparison(env, destination, schemas), timeout_s, what)
