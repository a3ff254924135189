"""How each PostgreSQL column is kept in Snowflake (``warehouse.types`` says which families are
native and why): BOOLEAN, NUMBER(5|10|19, 0) for the integers, BINARY for bytea, VARCHAR for text
and uuid (its lowercase text, which sorts as its bytes); every other family as PostgreSQL's
text in a VARCHAR."""

from __future__ import annotations

from rosetta_dagster.core.destination.warehouse.types import (
    KeptType,
    bool_text,
    bytea_text,
    integer_text,
    kept_type,
    uuid_text,
)
from rosetta_dagster.core.destination.warehouse.types import (
    ordered_like_postgres as _ordered,
)
from rosetta_dagster.core.table_schema import Column

TEXT = KeptType("VARCHAR", "{}", str, native=False)
_NATIVE: dict[str, KeptType] = {
    "bool": KeptType("BOOLEAN", "TO_BOOLEAN({})", bool_text, native=True),
    "int2": KeptType("NUMBER(5, 0)", "CAST({} AS NUMBER(5, 0))", integer_text, native=True),
    "int4": KeptType("NUMBER(10, 0)", "CAST({} AS NUMBER(10, 0))", integer_text, native=True),
    "int8": KeptType("NUMBER(19, 0)", "CAST({} AS NUMBER(19, 0))", integer_text, native=True),
    "uuid": KeptType("VARCHAR", "{}", uuid_text, native=True),
    "bytea": KeptType("BINARY", "TO_BINARY(SUBSTR({}, 3), 'HEX')", bytea_text, native=True),
    "text": KeptType("VARCHAR", "{}", str, native=True),
    "varchar": KeptType("VARCHAR", "{}", str, native=True),
    "bpchar": KeptType("VARCHAR", "{}", str, native=True),
    "name": KeptType("VARCHAR", "{}", str, native=True),
}


def snow_type(column: Column) -> KeptType:
    """The Snowflake type of a source column (a domain, an array, an enum...: its text)."""
    return kept_type(column, _NATIVE, TEXT)


def ordered_like_postgres(column: Column) -> bool:
    """Whether Snowflake sorts and compares the column's values as PostgreSQL does."""
    return _ordered(column, _NATIVE, TEXT)
