"""What the fuzzer writes: its tables, their hostile values, and the SQL script it ran.

Every table lives in an example's own schema of the source database. Values are SQL text
input with parameters; TOAST-sized values are ``<schema>.big(seed, length)`` (incompressible,
so stored out of line, and short in a reproduction script).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st
from psycopg2 import sql

from rosetta_dagster.harness.type_matrix import Family, families_for

# Hostile text: quotes, backslashes, newlines, tabs, emoji, the COPY null marker, spaces.
HOSTILE_TEXT = ("", "it's \"quoted\"", "back\\slash", "new\nline\ttab\rcr", "🐘 ü 中文", "\\N",
                "NULL", "  padded  ", "x" * 300)
TEXT_KEYS = ("a", "it's", "back\\slash", "🐘", "two words", "", "NULL", "\\N", "k" * 120, "b")
NUMERICS = ("0", "-0.000001", "NaN", "Infinity", "-Infinity", "123456789012345678901234.5678",
            "1e-30", "42")
TIMESTAMPS = ("infinity", "-infinity", "4713-01-01 00:00:00+00 BC", "2000-02-29 12:00:00.000001+05:30",
              "1970-01-01 00:00:00+00", "294276-12-31 23:59:59.999999+00")
JSONS = ('{"a": [1, {"b": null}], "é": "🐘"}', "[]", '"str"', "1e400", "null",
         '{"big": "' + "j" * 3000 + '"}')
# Lengths around the TOAST threshold (about 2 kB) and well past it.
BIG_LENGTHS = (0, 40, 1900, 2100, 5000, 30000)
UUIDS = tuple(str(uuid.UUID(int=i * 0x1000000000000000000000001 + 7)) for i in range(24))
# Kinds whose values are drawn from a list, with the type they are cast to.
SAMPLED = {"numeric": ("numeric", NUMERICS), "timestamptz": ("timestamptz", TIMESTAMPS),
           "jsonb": ("jsonb", JSONS), "uuid": ("uuid", UUIDS), "region": ("text", ("eu", "us", "apac"))}

def big_function(schema: str) -> sql.Composed:
    """``<schema>.big(seed, length)``: that many characters of incompressible text."""
    return sql.SQL(
        "CREATE FUNCTION {}(seed int, len int) RETURNS text LANGUAGE sql IMMUTABLE AS $$ "
        "SELECT left(coalesce(string_agg(md5(seed::text || ':' || i::text), '' ORDER BY i), ''), "
        "len) FROM generate_series(0, len / 32) i $$").format(sql.Identifier(schema, "big"))


@dataclass(frozen=True)
class Value:
    """One SQL value: an expression with ``%s`` placeholders, and its parameters."""

    expression: sql.Composable
    params: tuple[object, ...] = ()


NULL = Value(sql.SQL("NULL"))
_PARAM = sql.SQL("%s")


def _param(value: object) -> Value:
    return Value(_PARAM, (value,))


def _cast(type_sql: str) -> sql.Composable:
    return sql.SQL("%s::{}").format(sql.SQL(type_sql))


@dataclass(frozen=True)
class FuzzColumn:
    name: str
    type_sql: str
    kind: str  # how values are drawn: int, text, big, bytea, numeric, timestamptz, jsonb, bool, family:<n>
    storage: str | None = None  # EXTERNAL: out of line without compression


@dataclass(frozen=True)
class FuzzTable:
    name: str
    columns: tuple[FuzzColumn, ...]
    key: tuple[str, ...]
    key_kind: str  # int | text | uuid | int_text | few (a handle repeated among rows)
    options: dict[str, object] = field(default_factory=dict)  # the pipeline file's table entry
    in_pipeline: bool = True  # False: added to the pipeline later (a load under a fence)
    identity_full: bool = False  # REPLICA IDENTITY FULL from the start (row filters need it)
    # How the source tells its rows apart: "primary_key"; "index" (no primary key, REPLICA
    # IDENTITY USING a unique index on ``key``); "full" (no key at all, REPLICA IDENTITY FULL:
    # ``key`` is only the workload's handle on rows, repeated among duplicates).
    identity: str = "primary_key"
    # The rows a pipeline replicates, as a condition on the table (the row filter).
    replicated: str = "TRUE"

    @property
    def keyless(self) -> bool:
        return self.identity == "full"

    @property
    def value_columns(self) -> tuple[FuzzColumn, ...]:
        return tuple(c for c in self.columns if c.name not in self.key)

    def column(self, name: str) -> FuzzColumn:
        return next(c for c in self.columns if c.name == name)


def _c(name: str, type_sql: str, kind: str, storage: str | None = None) -> FuzzColumn:
    return FuzzColumn(name, type_sql, kind, storage)


def fuzz_tables(engine: str, *, engine_snapshot: bool = False) -> tuple[FuzzTable, ...]:
    """The example's tables; ``engine_snapshot``: loaded by the engine's own snapshot
    (``initial_load: debezium``), which takes neither tables without a key nor table options."""
    tables = _all_tables(engine)
    if engine_snapshot:
        return tuple(t for t in tables if not t.keyless and not t.options)
    return tables


def _all_tables(engine: str) -> tuple[FuzzTable, ...]:
    matrix = tuple(_c(f"v_{f.name}", f.type_sql, f"family:{f.name}") for f in _families(engine))
    return (
        FuzzTable("orders", (_c("id", "int", "int"), _c("note", "text", "text"),
                             _c("big", "text", "big", "EXTERNAL"), _c("doc", "text", "big"),
                             _c("blob", "bytea", "bytea"), _c("amount", "numeric", "numeric"),
                             _c("at", "timestamptz", "timestamptz")), ("id",), "int"),
        FuzzTable("lines", (_c("order_id", "int", "int"), _c("line", "text", "text"),
                            _c("qty", "int", "int"), _c("spec", "jsonb", "jsonb"),
                            _c("big", "text", "big")), ("order_id", "line"), "int_text"),
        FuzzTable("tags", (_c("tag", "text", "text"), _c("body", "text", "big", "EXTERNAL"),
                           _c("n", "int", "int"), _c("flag", "bool", "bool")), ("tag",), "text"),
        FuzzTable("things", (_c("id", "uuid", "uuid"), _c("payload", "text", "text"),
                             _c("big", "text", "big")), ("id",), "uuid"),
        FuzzTable("matrix", (_c("id", "int", "int"), *matrix), ("id",), "int"),
        # A column list and a row filter on the key: rows move in and out by key updates.
        FuzzTable("opts", (_c("id", "int", "int"), _c("secret", "text", "text"),
                           _c("amount", "numeric", "numeric"), _c("note", "text", "big")),
                  ("id",), "int", options={"exclude_columns": ["secret"], "where": "id % 3 <> 0"},
                  replicated="id % 3 <> 0"),
        # A row filter on another column (replica identity FULL): rows move in and out by
        # updates of that column.
        FuzzTable("filtered", (_c("id", "int", "int"), _c("region", "text", "region"),
                               _c("amount", "numeric", "numeric"), _c("note", "text", "big")),
                  ("id",), "int", options={"where": "region <> 'eu'"}, identity_full=True,
                  replicated="region <> 'eu'"),
        FuzzTable("late", (_c("id", "int", "int"), _c("val", "text", "text"),
                           _c("big", "text", "big")), ("id",), "int", in_pipeline=False),
        # No primary key: keyed by a replica identity index; and no key at all (duplicates).
        FuzzTable("indexed", (_c("email", "text", "text"), _c("n", "int", "int"),
                              _c("big", "text", "big", "EXTERNAL"), _c("spec", "jsonb", "jsonb")),
                  ("email",), "text", identity="index"),
        FuzzTable("events", (_c("k", "int", "int"), _c("label", "text", "text"),
                             _c("big", "text", "big", "EXTERNAL"),
                             _c("amount", "numeric", "numeric"), _c("spec", "jsonb", "jsonb")),
                  ("k",), "few", identity="full"),
    )


def _families(engine: str) -> tuple[Family, ...]:
    # xml holds no value on the embedded PostgreSQL (no libxml); name and the reg* types are
    # covered by the type matrix.
    return tuple(f for f in families_for(engine) if f.values and f.name not in ("xml",))


def family_values(engine: str) -> dict[str, tuple[str, ...]]:
    return {f.name: f.values for f in _families(engine)}


def value_strategy(column: FuzzColumn, schema: str, families: dict[str, tuple[str, ...]]
                   ) -> st.SearchStrategy[Value]:
    """Hostile values of a column's kind, NULL among them."""
    kind = column.kind
    big = sql.SQL("{}(%s, %s)").format(sql.Identifier(schema, "big"))
    values: st.SearchStrategy[Value]
    if kind == "int":
        values = st.integers(-2**31, 2**31 - 1).map(_param)
    elif kind == "text":
        values = st.one_of(st.sampled_from(HOSTILE_TEXT),
                           st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                                   max_size=12)).map(_param)
    elif kind == "big":
        values = st.one_of(
            st.tuples(st.integers(0, 99), st.sampled_from(BIG_LENGTHS)).map(lambda p: Value(big, p)),
            st.sampled_from(HOSTILE_TEXT).map(_param))
    elif kind == "bytea":
        hex_bytes = sql.SQL("decode({}, 'hex')").format(big)
        values = st.tuples(st.integers(0, 99), st.sampled_from(BIG_LENGTHS)).map(
            lambda p: Value(hex_bytes, (p[0], p[1] * 2)))
    elif kind in SAMPLED:
        type_sql, choices = SAMPLED[kind]
        values = st.sampled_from(choices).map(lambda v: Value(_cast(type_sql), (v,)))
    elif kind == "bool":
        values = st.booleans().map(_param)
    elif kind.startswith("family:"):
        cast = _cast(column.type_sql)
        values = st.sampled_from(families[kind.split(":", 1)[1]]).map(lambda v: Value(cast, (v,)))
    else:
        raise ValueError(f"unknown value kind {kind}")
    return st.one_of(values, st.just(NULL))


def key_values(table: FuzzTable) -> list[tuple[object, ...]]:
    """The keys a table's rows may take: few, so keys are reused (deleted, re-inserted,
    moved onto)."""
    if table.key_kind == "int":
        return [(i,) for i in range(1, 41)]
    if table.key_kind == "few":
        return [(i,) for i in range(1, 7)]
    if table.key_kind == "text":
        return [(k,) for k in TEXT_KEYS]
    if table.key_kind == "uuid":
        return [(u,) for u in UUIDS]
    return [(order, line) for order in range(1, 6) for line in TEXT_KEYS[:5]]


def names(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def key_condition(table: FuzzTable) -> sql.Composed:
    return sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in table.key)


def create_table_sql(schema: str, table: FuzzTable) -> list[sql.Composable]:
    qualified = sql.Identifier(schema, table.name)
    columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type_sql))
                                 for c in table.columns)
    if table.identity == "primary_key":
        columns = sql.SQL("{}, PRIMARY KEY ({})").format(columns, names(table.key))
    statements: list[sql.Composable] = [sql.SQL("CREATE TABLE {} ({})").format(qualified, columns)]
    if table.identity == "index":
        index = sql.Identifier(f"{table.name}_identity")
        statements += [sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(
            qualified, sql.Identifier(k)) for k in table.key]
        statements += [sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(
            index, qualified, names(table.key)),
            sql.SQL("ALTER TABLE {} REPLICA IDENTITY USING INDEX {}").format(qualified, index)]
    statements += [sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STORAGE {}").format(
        qualified, sql.Identifier(c.name), sql.SQL(c.storage)) for c in table.columns if c.storage]
    if table.identity_full or table.keyless:
        statements.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(qualified))
    return statements


class Script:
    """The SQL the fuzzer ran, in order, with the connection that ran it and the faults between:
    printed when an example fails (Hypothesis shrinks the example, so the last script printed is
    the minimal one)."""

    def __init__(self, echo: bool = False) -> None:
        self.lines: list[str] = []
        self.echo = echo  # print each line as it runs, with the time since the start
        self.started = time.monotonic()

    def _add(self, line: str) -> None:
        self.lines.append(line)
        if self.echo:
            print(f"    {time.monotonic() - self.started:7.2f} {line[:160]}", file=sys.stderr,
                  flush=True)

    def sql(self, connection: str, text: str) -> None:
        self._add(f"/* {connection} */ {text.strip()};")

    def note(self, text: str) -> None:
        self._add(f"-- {text}")

    def render(self, setup: Sequence[str] = ()) -> str:
        return "\n".join([*(f"{s.strip()};" for s in setup), *self.lines])
