"""How a warehouse destination keeps each PostgreSQL column, and how a kept value prints back
as PostgreSQL's text (under the pinned settings). Pure Python: no database here.

A family is kept in a type of the warehouse only where every value PostgreSQL accepts has
exactly one value there and prints back the same: booleans, integers, uuid, bytea and text.
Every other family is kept as PostgreSQL's own text in a text column: exact by construction,
and readable with the warehouse's casts where the user's values fit them. Deliberately not
native: floats (PostgreSQL's shortest float text differs from other renderings for some
values near 1e16-1e19, so a parity check could not tell a copied value from a changed one),
numeric (NaN, and precision beyond 38 digits), date/time families (BC, infinity, 24:00:00,
294276 AD), and every other family with no exact counterpart (ranges, geometric, network,
arrays, timetz...).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rosetta_dagster.core.table_schema import Column, TableSchema

Renderer = Callable[[Any], str]


def bool_text(value: bool) -> str:
    return "t" if value else "f"


def bytea_text(value: bytes) -> str:
    """PostgreSQL's hex form: \\x then two digits a byte."""
    return "\\x" + bytes(value).hex()


def uuid_text(value: Any) -> str:
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(str(value)))


def integer_text(value: Any) -> str:
    return str(int(value))


@dataclass(frozen=True)
class KeptType:
    """A column's type in the warehouse, how a staged PostgreSQL text value becomes it (an SQL
    expression of ``{}``: the text) and how its value prints back as PostgreSQL text."""

    sql: str
    cast: str
    render: Renderer
    native: bool  # False: PostgreSQL's text in a text column


# The families a warehouse may keep natively (each kind says how), and those whose order
# there is PostgreSQL's (text only under the C collation: not assumed).
NATIVE_FAMILIES = ("bool", "int2", "int4", "int8", "uuid", "bytea", "text", "varchar", "bpchar",
                   "name")
ORDERED_FAMILIES = frozenset({"bool", "int2", "int4", "int8", "uuid"})


def kept_type(column: Column, native: Mapping[str, KeptType], text: KeptType) -> KeptType:
    """The kept type of a source column (a domain, an array, an enum...: its text)."""
    if column.is_array or column.type_ref is not None and column.type_ref.user is not None:
        return text
    return native.get(column.base_type, text)


def ordered_like_postgres(column: Column, native: Mapping[str, KeptType], text: KeptType
                          ) -> bool:
    """Whether the warehouse sorts and compares the column's values as PostgreSQL does (key
    ranges of backfill chunks and of the parity checks' chunks mean the same rows on both
    sides): integers, booleans, and uuid (natively, or as its lowercase text, which sorts as
    its bytes)."""
    kept = kept_type(column, native, text)
    return column.base_type in ORDERED_FAMILIES and kept is native.get(column.base_type)


def refuse_backfill(schema: TableSchema, destination: str, kind: str, job_id: int, *,
                    filtered: bool, ordered: Callable[[Column], bool]) -> None:
    """Raise ``BackfillRefused`` when a backfill of ``schema`` into warehouse ``destination``
    cannot be exact: a job with a row filter (the filter's columns may be kept as text, whose
    order is not the type's), or a table whose key the warehouse does not sort as PostgreSQL (a
    chunk's key range would hold other rows)."""
    from rosetta_dagster.core.destination import BackfillRefused

    why = None
    unordered = [k for k in schema.key_columns if not ordered(schema.column(k))]
    if filtered:
        why = (f"destination {destination} is {kind}, which takes backfills of whole tables "
               "only (no filter) yet")
    elif unordered or schema.keyless:
        why = (f"destination {destination} is {kind}, where the key of "
               f"{schema.table.qualified} ({', '.join(unordered) or 'none'}) does not sort as in "
               "PostgreSQL, so a chunk's key range would hold other rows")
    if why is not None:
        raise BackfillRefused(f"Backfill job {job_id} of {schema.table.qualified} refused: "
                              f"{why}.")
