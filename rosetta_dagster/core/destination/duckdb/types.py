"""How each PostgreSQL column is kept in DuckDB, and how its value prints back as
PostgreSQL's text (under the pinned settings). Pure Python: no database here.

A family becomes a DuckDB type only where every value PostgreSQL accepts has exactly one
DuckDB value and prints back the same: booleans, integers, uuid, bytea (BLOB) and text. Every
other family is kept as PostgreSQL's own text in a VARCHAR: exact by construction, and
readable with DuckDB's casts (``CAST(v AS DATE)``...) where the user's values fit them.
Deliberately not (yet) native: floats (PostgreSQL's shortest float text differs from any
Python/DuckDB rendering for some values near 1e16-1e19, so a parity check could not tell a
copied value from a changed one), numeric (NaN has no DECIMAL), date/time families (BC,
infinity, 24:00:00, 294276 AD).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rosetta_dagster.core.table_schema import Column

Renderer = Callable[[Any], str]


def _bool_text(value: bool) -> str:
    return "t" if value else "f"


def _bytea_text(value: bytes) -> str:
    return "\\x" + bytes(value).hex()


def _uuid_text(value: Any) -> str:
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


@dataclass(frozen=True)
class DuckType:
    """A column's DuckDB type, how a staged PostgreSQL text value becomes it (an SQL
    expression of ``{}``: the VARCHAR) and how its value prints back as PostgreSQL text."""

    sql: str
    cast: str
    render: Renderer
    native: bool  # False: PostgreSQL's text in a VARCHAR


TEXT = DuckType("VARCHAR", "{}", str, native=False)
_NATIVE: dict[str, DuckType] = {
    "bool": DuckType("BOOLEAN", "CAST({} AS BOOLEAN)", _bool_text, native=True),
    "int2": DuckType("SMALLINT", "CAST({} AS SMALLINT)", str, native=True),
    "int4": DuckType("INTEGER", "CAST({} AS INTEGER)", str, native=True),
    "int8": DuckType("BIGINT", "CAST({} AS BIGINT)", str, native=True),
    "uuid": DuckType("UUID", "CAST({} AS UUID)", _uuid_text, native=True),
    # PostgreSQL's hex form: \x then two digits a byte.
    "bytea": DuckType("BLOB", "unhex(substr({}, 3))", _bytea_text, native=True),
    "text": DuckType("VARCHAR", "{}", str, native=True),
    "varchar": DuckType("VARCHAR", "{}", str, native=True),
    "bpchar": DuckType("VARCHAR", "{}", str, native=True),
    "name": DuckType("VARCHAR", "{}", str, native=True),
}


def duck_type(column: Column) -> DuckType:
    """The DuckDB type of a source column (a domain, an array, an enum...: its text)."""
    if column.is_array or column.type_ref is not None and column.type_ref.user is not None:
        return TEXT
    return _NATIVE.get(column.base_type, TEXT)


# DuckDB types whose order is PostgreSQL's (text only under the C collation: not here).
_ORDERED = ("BOOLEAN", "SMALLINT", "INTEGER", "BIGINT", "UUID")


def ordered_like_postgres(column: Column) -> bool:
    """Whether DuckDB sorts and compares the column's values as PostgreSQL does (key ranges
    of backfill chunks and of the parity checks' chunks mean the same rows on both sides)."""
    return duck_type(column).sql in _ORDERED
