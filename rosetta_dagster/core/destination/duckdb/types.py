"""How each PostgreSQL column is kept in DuckDB (``warehouse.types`` says which families are
native and why): BOOLEAN, SMALLINT/INTEGER/BIGINT, UUID, BLOB and VARCHAR; every other family
as PostgreSQL's text in a VARCHAR."""

from __future__ import annotations

from rosetta_dagster.core.destination.warehouse.types import (
    KeptType,
    bool_text,
    bytea_text,
    kept_type,
    uuid_text,
)
from rosetta_dagster.core.destination.warehouse.types import (
    ordered_like_postgres as _ordered,
)
from rosetta_dagster.core.table_schema import Column

TEXT = KeptType("VARCHAR", "{}", str, native=False)
_NATIVE: dict[str, KeptType] = {
    "bool": KeptType("BOOLEAN", "CAST({} AS BOOLEAN)", bool_text, native=True),
    "int2": KeptType("SMALLINT", "CAST({} AS SMALLINT)", str, native=True),
    "int4": KeptType("INTEGER", "CAST({} AS INTEGER)", str, native=True),
    "int8": KeptType("BIGINT", "CAST({} AS BIGINT)", str, native=True),
    "uuid": KeptType("UUID", "CAST({} AS UUID)", uuid_text, native=True),
    "bytea": KeptType("BLOB", "unhex(substr({}, 3))", bytea_text, native=True),
    "text": KeptType("VARCHAR", "{}", str, native=True),
    "varchar": KeptType("VARCHAR", "{}", str, native=True),
    "bpchar": KeptType("VARCHAR", "{}", str, native=True),
    "name": KeptType("VARCHAR", "{}", str, native=True),
}


def duck_type(column: Column) -> KeptType:
    """The DuckDB type of a source column (a domain, an array, an enum...: its text)."""
    return kept_type(column, _NATIVE, TEXT)


def ordered_like_postgres(column: Column) -> bool:
    """Whether DuckDB sorts and compares the column's values as PostgreSQL does."""
    return _ordered(column, _NATIVE, TEXT)
