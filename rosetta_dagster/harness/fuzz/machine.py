"""The differential fuzzer's state machine: random change sequences and faults against a real
stream, the source itself as the oracle.

One example: tables with a few rows are created, the stream starts (initial load), then steps
run in any order: inserts, updates, key updates, deletes, upserts and COPY with hostile values
on two connections (transactions interleaved, savepoints rolled back, whole transactions rolled
back), TRUNCATE, ADD/DROP COLUMN, ALTER COLUMN TYPE, REPLICA IDENTITY changes, a table added to
the pipeline, and faults: kill -9 of the stream, its clean restart (SIGTERM), restarts of either
destination or the source (fast or a crash), the replication slot dropped (re-sync), the second
destination down for a while, backfills while writes go on. At the end every destination must
hold exactly what the source replicates (row by row, as text under the pinned settings);
otherwise the example fails with the SQL script that ran. Hypothesis shrinks a failing
example, so the script printed last is a minimal one.
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from psycopg2 import sql

from rosetta_dagster.harness.fuzz.oracle import (
    Row,
    TableView,
    connect,
    differences,
    expected_columns,
    rows,
)
from rosetta_dagster.harness.fuzz.watchdog import ExampleWatchdog
from rosetta_dagster.harness.fuzz.workload import (
    FuzzColumn,
    FuzzTable,
    Script,
    Value,
    family_values,
    key_condition,
    key_values,
    names,
    value_strategy,
)
from rosetta_dagster.harness.fuzz.world import Backfill, Example, FuzzWorld, backfill_failures

CONNECTIONS = ("A", "B")
# An example converging after this long is printed whole (script and stream log): worth a look.
SLOW_EXAMPLE_S = 60.0
# An added column's type, and what ALTER COLUMN TYPE turns each type into.
ADDED_KINDS = {"int": "int", "text": "text", "numeric": "numeric", "big": "text"}
RETYPES = {"int": ("bigint", "int"), "bigint": ("numeric", "numeric"),
           "numeric": ("text", "text")}
LOST_CONNECTION = (psycopg2.OperationalError, psycopg2.InterfaceError)


@dataclass
class Transaction:
    """An open transaction of one connection: what it locked, its savepoints and the table
    columns as they were at each of them (DDL rolls back with it)."""

    columns: dict[str, list[FuzzColumn]]  # as at BEGIN
    touched: set[tuple[str, Row | None]] = field(default_factory=set)  # None: the whole table
    savepoints: list[tuple[str, dict[str, list[FuzzColumn]]]] = field(default_factory=list)
    exclusive: bool = False  # holds a table lock: the other connection waits for nothing
    native_after_commit: list[sql.Composable] = field(default_factory=list)


class RosettaMachine(RuleBasedStateMachine):
    """Bound to a world and an engine by :func:`machine_for`."""

    world: ClassVar[FuzzWorld]
    engine: ClassVar[str]
    native: ClassVar[bool] = False
    converge_timeout_s: ClassVar[float] = 120.0
    # Examples load (and re-sync) by the engine's own snapshot (one round in three, Debezium).
    engine_snapshot: ClassVar[bool] = False
    # Per example, at most: schema changes, and faults (beyond them, steps write).
    max_ddl: ClassVar[int] = 4
    max_faults: ClassVar[int] = 3
    stats: ClassVar[dict[str, int]]  # examples, statements and faults run (per machine class)
    # Every divergence report, also of examples Hypothesis then discards (one that ran out of
    # data mid-step is dropped with whatever its teardown raised): the runner reports them.
    divergences: ClassVar[list[str]]

    def __init__(self) -> None:
        super().__init__()
        self.example = Example(self.world, self.engine, engine_snapshot=self.engine_snapshot)
        self.example.create()
        self.script = Script(echo=os.environ.get("ROSETTA_FUZZ_VERBOSE") == "1")
        self.tables = {t.name: t for t in self.example.tables}
        self.columns: dict[str, list[FuzzColumn]] = {t.name: list(t.columns)
                                                      for t in self.example.tables}
        self.conns: dict[str, psycopg2.extensions.connection] = {
            name: self.example.connect_source() for name in CONNECTIONS}
        self.tx: dict[str, Transaction | None] = dict.fromkeys(CONNECTIONS)
        self.families = family_values(self.engine)
        self.strategies: dict[tuple[str, str], st.SearchStrategy[Value]] = {}
        self.column_numbers = itertools.count(1)
        self.savepoint_numbers = itertools.count(1)
        self.second_down = False
        self.stream_exits_when_down = 0  # the stream's exits before d2 went down
        self.started = False
        self.ddl = self.faults = 0
        self.began = time.monotonic()
        self.watchdog = ExampleWatchdog(self.example.name, lambda: self.script.lines)

    # -- running SQL -------------------------------------------------------------------------

    def _run(self, conn: str, statement: str | sql.Composable, params: Sequence[object] = ()
             ) -> bool:
        """Run and record a statement; an error rolls its transaction back (False)."""
        connection = self.conns[conn]
        try:
            with connection.cursor() as cursor:
                text = cursor.mogrify(statement, tuple(params)).decode()
                self.script.sql(conn, text)
                cursor.execute(text)
            return True
        except LOST_CONNECTION as exc:
            self.script.note(f"[{conn}] connection lost: {_first_line(exc)}")
            self._lost(conn)
        except psycopg2.Error as exc:
            self.script.note(f"[{conn}] failed: {_first_line(exc)}")
            if self.tx[conn] is not None:
                self._end(conn, "ROLLBACK")
        return False

    def _lost(self, conn: str) -> None:
        """The connection died (a source restart): its transaction is gone."""
        tx = self.tx[conn]
        if tx is not None:
            self.columns = tx.columns
            self.tx[conn] = None
        try:
            self.conns[conn].close()
        except psycopg2.Error:
            pass
        self.conns[conn] = self._reconnect()

    def _reconnect(self) -> psycopg2.extensions.connection:
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.example.connect_source()
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def _end(self, conn: str, verb: str) -> None:
        tx = self.tx[conn]
        assert tx is not None
        self.tx[conn] = None
        try:
            with self.conns[conn].cursor() as cursor:
                self.script.sql(conn, verb)
                cursor.execute(verb)
        except LOST_CONNECTION:
            self._lost(conn)
            verb = "ROLLBACK"
        if verb == "ROLLBACK":
            self.columns = tx.columns
        else:
            for statement in tx.native_after_commit:
                self.example.native_ddl(statement)

    def _other(self, conn: str) -> str:
        return "B" if conn == "A" else "A"

    def _usable(self, conn: str) -> str:
        """``conn``, unless the other connection holds a table lock (then that one)."""
        other = self._other(conn)
        tx = self.tx[other]
        return other if tx is not None and tx.exclusive else conn

    def _blocked(self, conn: str, table: str) -> tuple[set[Row], bool]:
        """Keys of ``table`` the other connection's open transaction holds, and whether it
        holds the whole table."""
        tx = self.tx[self._other(conn)]
        if tx is None:
            return set(), False
        keys = {key for name, key in tx.touched if name == table}
        return {k for k in keys if k is not None}, None in keys

    def _touch(self, conn: str, table: str, *keys: Row | None) -> None:
        tx = self.tx[conn]
        if tx is not None:
            tx.touched.update((table, key) for key in keys)

    def _keys(self, conn: str, table: FuzzTable) -> list[Row]:
        """The keys ``conn`` sees, in key order."""
        key_list = names(table.key)
        try:
            with self.conns[conn].cursor() as cursor:
                cursor.execute(sql.SQL("SELECT {keys} FROM {table} ORDER BY {keys}").format(
                    keys=key_list, table=self.example.qualified(table.name)))
                return [tuple(row) for row in cursor.fetchall()]
        except LOST_CONNECTION:
            self._lost(conn)
        except psycopg2.Error:
            if self.tx[conn] is not None:
                self._end(conn, "ROLLBACK")
        return []

    def _value(self, data: st.DataObject, table: str, column: FuzzColumn) -> Value:
        strategy = self.strategies.get((table, column.name))
        if strategy is None:
            strategy = value_strategy(column, self.example.schema, self.families)
            self.strategies[(table, column.name)] = strategy
        return data.draw(strategy, label=f"{table}.{column.name}")

    # -- set up ------------------------------------------------------------------------------

    @initialize(data=st.data())
    def load_and_start(self, data: st.DataObject) -> None:
        """A few rows in every table, then the stream: its initial load runs while the steps
        that follow write."""
        for table in self.example.tables:
            for _ in range(data.draw(st.integers(0, 4), label=f"{table.name} rows")):
                self._insert("A", data, table)
        self.script.note("start the stream (initial load)")
        self.example.mark_started()
        self.example.stream.start()
        self.started = True
        if self.native:
            self._wait_for_publication()
            self.example.start_native()
        if data.draw(st.sampled_from((True, True, True, False)), label="steps after the load"):
            self.script.note("wait until the initial load is done")
            self._converged(deadline=time.monotonic() + 120)

    def _wait_for_publication(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with self.conns["A"].cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s",
                               (f"rosetta_{self.example.name}",))
                if cursor.fetchone():
                    return
            time.sleep(0.3)
        raise AssertionError("the stream never created its publication:\n"
                             + self.example.stream.log_tail())

    # -- row changes ---------------------------------------------------------------------------

    def _table(self, data: st.DataObject) -> FuzzTable:
        return self.tables[data.draw(st.sampled_from(sorted(self.tables)), label="table")]

    # Keys are picked by a drawn number, whatever the tables hold: the same draws whatever a
    # replay finds in the database (Hypothesis needs that to replay and shrink an example).
    @staticmethod
    def _pick(data: st.DataObject, choices: list[Row], label: str) -> Row | None:
        index = data.draw(st.integers(0, 999), label=label)
        return choices[index % len(choices)] if choices else None

    def _free_key(self, data: st.DataObject, conn: str, table: FuzzTable, existing: list[Row]
                  ) -> Row | None:
        blocked, whole = self._blocked(conn, table.name)
        # Without a key, a handle already taken makes a duplicate.
        taken = blocked if table.keyless else set(existing) | blocked
        free = [] if whole else [k for k in key_values(table) if k not in taken]
        return self._pick(data, free, "new key")

    def _existing_key(self, data: st.DataObject, conn: str, table: FuzzTable,
                      existing: list[Row]) -> Row | None:
        blocked, whole = self._blocked(conn, table.name)
        usable = [] if whole else [k for k in existing if k not in blocked]
        return self._pick(data, usable, "key")

    def _insert(self, conn: str, data: st.DataObject, table: FuzzTable,
                upsert: bool = False) -> None:
        upsert = upsert and not table.keyless  # ON CONFLICT needs a unique key
        existing = self._keys(conn, table)
        on_existing = upsert and data.draw(st.booleans(), label="on an existing key")
        existing_key = self._existing_key(data, conn, table, existing) if upsert else None
        free_key = self._free_key(data, conn, table, existing)
        key = (existing_key if on_existing else None) or free_key
        if key is None:
            return
        columns = [c for c in self.columns[table.name] if c.name not in table.key]
        values = [self._value(data, table.name, c) for c in columns]
        expressions = [sql.SQL("%s")] * len(table.key) + [v.expression for v in values]
        params = [*key, *(p for v in values for p in v.params)]
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.example.qualified(table.name), names([*table.key, *(c.name for c in columns)]),
            sql.SQL(", ").join(expressions))
        if upsert and columns:
            statement += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                names(table.key), sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c.name))
                    for c in columns[:2]))
        if self._run(conn, statement, params):
            self._touch(conn, table.name, key)

    def _assignments(self, data: st.DataObject, table: FuzzTable, at_least: int = 1
                     ) -> tuple[list[sql.Composable], list[object]]:
        columns = [c for c in self.columns[table.name] if c.name not in table.key]
        if not columns:
            return [], []
        chosen = data.draw(st.lists(st.sampled_from(columns), min_size=at_least, max_size=3,
                                    unique_by=lambda c: c.name), label="columns")
        values = [self._value(data, table.name, c) for c in chosen]
        return ([sql.SQL("{} = {}").format(sql.Identifier(c.name), v.expression)
                 for c, v in zip(chosen, values, strict=True)],
                [p for v in values for p in v.params])

    @rule(data=st.data(), count=st.integers(1, 4))
    def write(self, data: st.DataObject, count: int) -> None:
        """Row changes, each on one connection (in its transaction, if it has one open)."""
        for _ in range(count):
            self._write(data)

    def _write(self, data: st.DataObject) -> None:
        conn = self._usable(data.draw(st.sampled_from(CONNECTIONS), label="connection"))
        table = self._table(data)
        operation = data.draw(st.sampled_from(
            ("insert", "insert", "update", "update", "update_key", "update_key", "delete",
             "upsert", "update_many", "copy")), label="operation")
        if operation in ("insert", "upsert"):
            self._insert(conn, data, table, upsert=operation == "upsert")
            return
        if operation == "copy":
            self._copy(conn, data, table)
            return
        if operation == "update_many":
            self._update_many(conn, data, table)
            return
        existing = self._keys(conn, table)
        key = self._existing_key(data, conn, table, existing)
        if key is None:
            self._insert(conn, data, table)
            return
        where = key_condition(table)
        target = self.example.qualified(table.name)
        if operation == "delete":
            if self._run(conn, sql.SQL("DELETE FROM {} WHERE {}").format(target, where), key):
                self._touch(conn, table.name, key)
            return
        if operation == "update":
            sets, params = self._assignments(data, table)
            if sets and self._run(conn, _update(target, sets, where), [*params, *key]):
                self._touch(conn, table.name, key)
            return
        new_key = self._free_key(data, conn, table, existing)
        if new_key is None:
            return
        sets, params = self._assignments(data, table, at_least=0)
        key_sets: list[sql.Composable] = [sql.SQL("{} = %s").format(sql.Identifier(k))
                                          for k in table.key]
        if self._run(conn, _update(target, key_sets + sets, where), [*new_key, *params, *key]):
            self._touch(conn, table.name, key, new_key)

    def _copy(self, conn: str, data: st.DataObject, table: FuzzTable) -> None:
        """Rows at new keys in one COPY, each a copy of an existing row's values (or NULLs):
        PostgreSQL writes a page of COPY rows as one WAL record, so their changes share one
        LSN, and a stream that stops inside such a group must still deliver all of it."""
        existing = self._keys(conn, table)
        template = self._existing_key(data, conn, table, existing)
        keys: list[Row] = []
        for _ in range(data.draw(st.integers(2, 40), label="rows copied")):
            key = self._free_key(data, conn, table, [*existing, *keys])
            if key is not None and (table.keyless or key not in keys):
                keys.append(key)
        if not keys:
            return
        others = [c.name for c in self.columns[table.name] if c.name not in table.key]
        target = self.example.qualified(table.name)
        # The server renders the rows as COPY text: hostile values stay exact.
        rows = sql.SQL("SELECT k.*{others} FROM (VALUES {keys}) AS k ({key}) LEFT JOIN "
                       "LATERAL (SELECT * FROM {target} WHERE {match} LIMIT 1) AS t ON true").format(
            others=sql.SQL("").join(sql.SQL(", t.{}").format(sql.Identifier(c)) for c in others),
            keys=sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(
                sql.Placeholder() * len(table.key))) for _ in keys),
            key=names(table.key), target=target,
            match=key_condition(table) if template is not None else sql.SQL("false"))
        params = [*(v for key in keys for v in key), *(template or ())]
        copy_in = sql.SQL("COPY {} ({}) FROM STDIN").format(target, names([*table.key, *others]))
        connection = self.conns[conn]
        try:
            with connection.cursor() as cursor:
                text = io.StringIO()
                select = cursor.mogrify(rows, params).decode()
                cursor.copy_expert(f"COPY ({select}) TO STDOUT", text)
                self.script.sql(conn, f"{copy_in.as_string(connection)};\n{text.getvalue()}\\.")
                text.seek(0)
                cursor.copy_expert(copy_in.as_string(connection), text)
        except LOST_CONNECTION as exc:
            self.script.note(f"[{conn}] connection lost: {_first_line(exc)}")
            self._lost(conn)
            return
        except psycopg2.Error as exc:
            self.script.note(f"[{conn}] failed: {_first_line(exc)}")
            if self.tx[conn] is not None:
                self._end(conn, "ROLLBACK")
            return
        self._touch(conn, table.name, *keys)

    def _update_many(self, conn: str, data: st.DataObject, table: FuzzTable) -> None:
        """Many rows in one statement (whole-table lock on the other connection's side)."""
        blocked, whole = self._blocked(conn, table.name)
        if blocked or whole:
            return
        sets, params = self._assignments(data, table)
        if not sets:
            return
        modulo = data.draw(st.integers(1, 4), label="every nth row")
        where = sql.SQL("abs(hashtext({}::text)) %% {} = 0").format(
            sql.Identifier(table.key[0]), sql.Literal(modulo))
        verb = data.draw(st.sampled_from(("UPDATE", "DELETE")), label="verb")
        target = self.example.qualified(table.name)
        statement = (_update(target, sets, where) if verb == "UPDATE"
                     else sql.SQL("DELETE FROM {} WHERE {}").format(target, where))
        if self._run(conn, statement, params if verb == "UPDATE" else ()):
            self._touch(conn, table.name, None)

    # -- transactions ------------------------------------------------------------------------

    @rule(conn=st.sampled_from(CONNECTIONS))
    def begin(self, conn: str) -> None:
        if self.tx[conn] is None and self._usable(conn) == conn and self._run(conn, "BEGIN"):
            self.tx[conn] = Transaction({t: list(c) for t, c in self.columns.items()})

    @rule(conn=st.sampled_from(CONNECTIONS), commit=st.booleans())
    def end(self, conn: str, commit: bool) -> None:
        if self.tx[conn] is not None:
            self._end(conn, "COMMIT" if commit else "ROLLBACK")

    @rule(conn=st.sampled_from(CONNECTIONS))
    def savepoint(self, conn: str) -> None:
        tx = self.tx[conn]
        if tx is None:
            return
        name = f"s{next(self.savepoint_numbers)}"
        if self._run(conn, sql.SQL("SAVEPOINT {}").format(sql.Identifier(name))):
            tx.savepoints.append((name, {t: list(c) for t, c in self.columns.items()}))

    @rule(conn=st.sampled_from(CONNECTIONS), data=st.data())
    def rollback_to_savepoint(self, conn: str, data: st.DataObject) -> None:
        tx = self.tx[conn]
        if tx is None or not tx.savepoints:
            return
        index = data.draw(st.integers(0, len(tx.savepoints) - 1), label="savepoint")
        name, columns = tx.savepoints[index]
        if self._run(conn, sql.SQL("ROLLBACK TO SAVEPOINT {}").format(sql.Identifier(name))):
            del tx.savepoints[index + 1:]
            self.columns = {t: list(c) for t, c in columns.items()}

    # -- schema changes ------------------------------------------------------------------------

    def _ddl_connection(self) -> str | None:
        """The connection a table-locking statement runs on (in its open transaction, if any),
        or None when both have one open."""
        open_ = [c for c in CONNECTIONS if self.tx[c] is not None]
        if len(open_) == 2:
            return None
        return open_[0] if open_ else "A"

    def _ddl(self, statement: sql.Composable, table: str, native: sql.Composable | None = None,
             native_after_commit: bool = False) -> bool:
        conn = self._ddl_connection()
        if conn is None:
            return False
        tx = self.tx[conn]
        if native is not None and not native_after_commit:
            try:
                self.example.native_ddl(native)  # the subscriber's table first (ADD, TYPE)
            except psycopg2.errors.ProgramLimitExceeded:
                return False  # PostgreSQL refuses it anywhere: a default too big for the catalog
        if not self._run(conn, statement):
            return False
        self.ddl += 1
        if tx is not None and self.tx[conn] is tx:
            tx.exclusive = True
            tx.touched.add((table, None))
            if native is not None and native_after_commit:
                tx.native_after_commit.append(native)
        elif native is not None and native_after_commit:
            self.example.native_ddl(native)
        return True

    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule(data=st.data())
    def add_column(self, data: st.DataObject) -> None:
        table = self._table(data)
        if table.options:  # a column list: a new column streams after a restart only
            return
        kind = data.draw(st.sampled_from(sorted(ADDED_KINDS)), label="kind")
        column = FuzzColumn(f"c{next(self.column_numbers)}", ADDED_KINDS[kind], kind)
        statement = sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            self.example.qualified(table.name), sql.Identifier(column.name),
            sql.SQL(column.type_sql))
        if data.draw(st.booleans(), label="with a default"):
            value = self._value(data, table.name, column)
            # DDL takes no parameters: the value as a literal.
            with self.conns["A"].cursor() as cursor:
                literal = cursor.mogrify(value.expression, value.params or None).decode()
            statement += sql.SQL(" DEFAULT {}").format(sql.SQL(literal.replace("%", "%%")))
        if self._ddl(statement, table.name, native=statement):
            self.columns[table.name].append(column)

    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule(data=st.data())
    def drop_column(self, data: st.DataObject) -> None:
        table = self._table(data)
        added = [c for c in self.columns[table.name] if c.name.startswith("c")
                 and c.name[1:].isdigit()]
        if not added:
            return
        column = data.draw(st.sampled_from(added), label="column")
        statement = sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(
            self.example.qualified(table.name), sql.Identifier(column.name))
        if self._ddl(statement, table.name, native=statement, native_after_commit=True):
            self.columns[table.name].remove(column)

    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule(data=st.data())
    def alter_type(self, data: st.DataObject) -> None:
        table = self._table(data)
        if table.options:  # retyping a column of a column list or filter: refused by design
            return
        retypable = [c for c in self.columns[table.name]
                     if c.name not in table.key and c.type_sql in RETYPES]
        if not retypable:
            return
        column = data.draw(st.sampled_from(retypable), label="column")
        new_type, kind = RETYPES[column.type_sql]
        statement = sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
            self.example.qualified(table.name), sql.Identifier(column.name), sql.SQL(new_type))
        if self._ddl(statement, table.name, native=statement):
            columns = self.columns[table.name]
            columns[columns.index(column)] = FuzzColumn(column.name, new_type, kind,
                                                        column.storage)

    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule(data=st.data(), full=st.booleans())
    def replica_identity(self, data: st.DataObject, full: bool) -> None:
        table = self._table(data)
        if table.options or table.identity != "primary_key":
            # A column list or row filter depends on the replica identity; without a primary
            # key, DEFAULT would leave the table none.
            return
        self._ddl(sql.SQL("ALTER TABLE {} REPLICA IDENTITY {}").format(
            self.example.qualified(table.name), sql.SQL("FULL" if full else "DEFAULT")),
            table.name)

    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        tables = data.draw(st.lists(st.sampled_from(sorted(self.tables)), min_size=1,
                                    max_size=2, unique=True), label="tables")
        if any(self._blocked(self._ddl_connection() or "A", n)[0] for n in tables):
            return
        self._ddl(sql.SQL("TRUNCATE {}").format(sql.SQL(", ").join(
            self.example.qualified(n) for n in tables)), tables[0])

    @precondition(lambda self: "late" not in self.example.in_pipeline)
    @precondition(lambda self: self.ddl < self.max_ddl)
    @rule()
    def add_late_table(self) -> None:
        """A table joins the pipeline: the stream restarts and loads it under a fence while
        it keeps streaming the others."""
        self.ddl += 1
        self.script.note("add table late to the pipeline (restart: load under a fence)")
        self.example.add_table(self.tables["late"])

    # -- faults --------------------------------------------------------------------------------

    @precondition(lambda self: self.faults < self.max_faults)
    @rule(delay=st.sampled_from((0.0, 0.3, 1.5)))
    def kill_stream(self, delay: float) -> None:
        self.faults += 1
        self.script.note(f"kill -9 the stream; started again {delay}s later")
        self.example.stream.wanted = False
        self.example.stream.kill()
        time.sleep(delay)
        self.example.stream.start()

    @precondition(lambda self: self.faults < self.max_faults)
    @rule()
    def restart_stream(self) -> None:
        """SIGTERM (a clean close: the engine stores what it marked processed) and start."""
        self.faults += 1
        self.script.note("restart the stream (SIGTERM)")
        self.example.stream.stop()
        self.example.stream.start()

    @precondition(lambda self: self.faults < self.max_faults)
    @rule(which=st.sampled_from(("d1", "d2")), mode=st.sampled_from(("fast", "immediate")))
    def restart_destination(self, which: str, mode: str) -> None:
        self.faults += 1
        if which == "d2" and self.second_down:
            return
        cluster = self.world.destination if which == "d1" else self.world.second
        self.script.note(f"restart destination {which} ({mode})")
        cluster.stop(mode)
        cluster.start()

    @precondition(lambda self: self.faults < self.max_faults)
    @rule(mode=st.sampled_from(("fast", "immediate")))
    def restart_source(self, mode: str) -> None:
        self.faults += 1
        self.script.note(f"restart the source ({mode}): open transactions are lost")
        self.world.source.stop(mode)
        self.world.source.start()
        for conn in CONNECTIONS:
            self._lost(conn)

    @precondition(lambda self: self.faults < self.max_faults)
    @rule()
    def drop_slot(self) -> None:
        """The slot is lost while the stream is down: the next start re-syncs."""
        self.faults += 1
        self.script.note("stop the stream, drop its replication slot, start it (re-sync)")
        self.example.stream.stop()
        self.example.drop_slot()
        self.example.stream.start()

    @precondition(lambda self: self.faults < self.max_faults)
    @rule(mode=st.sampled_from(("fast", "immediate")))
    def second_destination_down(self, mode: str) -> None:
        self.faults += 1
        if not self.second_down:
            self.script.note(f"destination d2 goes down ({mode})")
            self.stream_exits_when_down = len(self.example.stream.exits)
            self.world.second.stop(mode)
            self.second_down = True

    @rule()
    def second_destination_up(self) -> None:
        if self.second_down:
            self.script.note("destination d2 is back")
            self.world.second.start()
            self.second_down = False

    @precondition(lambda self: self.faults < self.max_faults)
    @rule(data=st.data())
    def backfill(self, data: st.DataObject) -> None:
        self.faults += 1
        names = sorted(self.example.in_pipeline)
        table = data.draw(st.sampled_from(names), label="table")
        self.script.note(f"backfill {table} while writes go on")
        self.example.backfills.append(Backfill.request(self.example.pipeline(), self.world.store,
                                                       f"{self.example.schema}.{table}"))

    @rule(seconds=st.sampled_from((0.05, 0.2, 0.5)))
    def pause(self, seconds: float) -> None:
        """Time passes: the stream applies what was written so far in batches of its own."""
        time.sleep(seconds)

    # Nothing to wait for while a table lock of the workload holds the oracle up, or while the
    # second destination is down with an engine that keeps one position for all destinations.
    @precondition(lambda self: not any(tx is not None and tx.exclusive for tx in self.tx.values())
                  and not (self.second_down and self.engine == "debezium"))
    @rule()
    def wait_until_caught_up(self) -> None:
        """A pause: the next changes start a new batch."""
        self.script.note("wait until the destinations caught up")
        self._converged(deadline=time.monotonic() + 15)

    # -- the oracle ----------------------------------------------------------------------------

    def _views(self) -> list[TableView]:
        return [TableView(self.example.schema, name,
                          () if self.tables[name].keyless else self.tables[name].key,
                          tuple(self.tables[name].options.get("exclude_columns", [])),  # type: ignore[arg-type]
                          self.tables[name].replicated)
                for name in sorted(self.example.in_pipeline)]

    def _diff(self) -> dict[str, list[str]]:
        """Differences per destination and table (empty: converged)."""
        found: dict[str, list[str]] = {}
        targets = [(name, url) for name, url in self.example.destination_urls()
                   if not (name == "d2" and self.second_down)]
        if self.native and self.example.native:
            targets.append(("native replication", self.example.native_url))
        conns: dict[str, psycopg2.extensions.connection] = {}
        try:
            conns["source"] = connect(self.example.source_url)
            for name, url in targets:
                try:
                    conns[name] = connect(url)
                except psycopg2.OperationalError as exc:
                    found[name] = [_first_line(exc)]
            for view in self._views():
                try:
                    columns = expected_columns(conns["source"], view)
                    expected = rows(conns["source"], view.schema, view.name, view.key, columns,
                                    view.replicated)
                except psycopg2.Error as exc:  # locked by an open transaction of the workload
                    found.setdefault("source", []).append(f"{view.name}: {_first_line(exc)}")
                    continue
                for name, _ in targets:
                    if name not in conns:
                        continue
                    schema = (view.schema if name == "native replication"
                              else self.example.target_schema)
                    try:
                        actual = rows(conns[name], schema, view.name, view.key, columns)
                    except psycopg2.Error as exc:
                        found.setdefault(name, []).append(f"{view.name}: {_first_line(exc)}")
                        continue
                    found.setdefault(name, []).extend(
                        f"{view.name} {line}" for line in differences(expected, actual, columns))
        except psycopg2.OperationalError as exc:
            found.setdefault("source", []).append(_first_line(exc))
        finally:
            for conn in conns.values():
                conn.close()
        return {name: lines for name, lines in found.items() if lines}

    def _converged(self, deadline: float) -> tuple[dict[str, list[str]], bool]:
        """Wait until every destination equals the source, then until the stream has also
        consumed everything written before that moment (nothing stale still in flight) and
        they are still equal; or until ``deadline``. Returns the last differences, and whether
        the stream had consumed the source's WAL up to then."""
        while True:
            self.example.run_requested_backfills()
            found = self._diff()
            if self._start_failed_while_down():
                return found, False
            settled = False
            if not self._rosetta(found):
                # A destination that is down holds the slot back: nothing to wait for.
                settled = self.second_down or self._settled(deadline)
                found = self._diff()
                if not self._rosetta(found) and settled:
                    return found, True
            if time.monotonic() > deadline:
                return found, settled
            time.sleep(0.5)

    def _start_failed_while_down(self) -> bool:
        """With d2 down, a stream that starts again cannot open d2 and exits, until d2 is back
        (docs/design.md, several destinations): nothing to wait for meanwhile."""
        return self.second_down and any(
            code not in (0, -signal.SIGKILL)
            for code in self.example.stream.exits[self.stream_exits_when_down:])

    @staticmethod
    def _rosetta(found: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: v for k, v in found.items() if k != "native replication"}

    def _settled(self, deadline: float) -> bool:
        """True once the pipeline's slot confirmed the source's WAL position of now."""
        try:
            conn = connect(self.example.source_url)
        except psycopg2.OperationalError:
            return False
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_current_wal_lsn()")
                (now,) = cursor.fetchone()  # type: ignore[misc]
                while time.monotonic() < deadline:
                    cursor.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM "
                                   "pg_replication_slots WHERE slot_name = %s",
                                   (now, f"rosetta_{self.example.name}"))
                    row = cursor.fetchone()
                    if row is not None and row[0]:
                        return True
                    time.sleep(0.3)
            return False
        finally:
            conn.close()

    def teardown(self) -> None:
        outcome = "failed"
        try:
            if self.started:
                self._check()
            outcome = "converged"
        except AssertionError as exc:
            type(self).divergences.append(str(exc))
            raise
        finally:
            statements = sum(1 for line in self.script.lines if line.startswith("/*"))
            backfills = self.example.backfills
            print(f"  example {self.example.name}: {statements} statements, {self.faults} "
                  f"faults, {self.ddl} schema changes, "
                  f"{sum(b.completed for b in backfills)}/{len(backfills)} backfills completed, "
                  f"{time.monotonic() - self.began:.0f} s, {outcome}", file=sys.stderr, flush=True)
            took = time.monotonic() - self.began
            if took > SLOW_EXAMPLE_S and outcome == "converged":  # right, but worth a look
                print("    a slow example; its script, then its stream's last lines:\n"
                      + textwrap.indent("\n".join(self.script.lines), "      ") + "\n"
                      + textwrap.indent(self.example.stream.log_tail(40), "      | "),
                      file=sys.stderr, flush=True)
            for backfill in backfills:
                if not backfill.completed and backfill.errors:  # what stopped it, for a look
                    print(f"    backfill job {backfill.job.id} ({backfill.job.table_name}) did "
                          f"not complete; its attempts' errors: {' | '.join(backfill.errors)}",
                          file=sys.stderr, flush=True)
            stats = type(self).stats
            stats["examples"] = stats.get("examples", 0) + 1
            stats["statements"] = stats.get("statements", 0) + sum(
                1 for line in self.script.lines if line.startswith("/*"))
            stats["faults"] = stats.get("faults", 0) + sum(
                1 for line in self.script.lines if line.startswith("-- ") and any(
                    word in line for word in ("kill", "restart", "drop", "down", "backfill")))
            for conn in self.conns.values():
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
            self.example.close()
            self.watchdog.stop()

    def _check(self) -> None:
        for conn in CONNECTIONS:
            if self.tx[conn] is not None:
                self._end(conn, "COMMIT")
        self.second_destination_up()
        self.script.note("end: wait for every destination to equal the source")
        if "late" in self.example.in_pipeline:
            self.example.refresh_native()
        self.example.run_requested_backfills()
        pending = [b for b in self.example.backfills if not b.wait(180)]
        found, settled = self._converged(time.monotonic() + self.converge_timeout_s)
        if any(not b.wait(0) for b in self.example.backfills):  # requested by the stream meanwhile
            pending = [b for b in self.example.backfills if not b.wait(180)]
            found, settled = self._converged(time.monotonic() + self.converge_timeout_s)
        if not self._rosetta(found) and settled and not pending:
            return
        report = [f"Divergence on the {self.engine} engine (pipeline {self.example.name}):"]
        if not self._rosetta(found) and not settled:
            report.append("  every destination equals the source, but the stream did not "
                          f"consume the source's WAL within {self.converge_timeout_s:.0f} s")
        for name, lines in found.items():
            report.append(f"  {name}:")
            report.extend(f"    {line}" for line in lines)
        if "native replication" not in found and self.native and self.example.native:
            report.append("  native replication: equal to the source")
        elif self.example.native_retired:
            report.append(f"  {self.example.native_retired}")
        if pending:
            report.append(f"  {len(pending)} backfill(s) still running")
        report.extend(f"  {line}" for line in backfill_failures(self.example.backfills))
        report.append(f"  stream: {self.example.stream.starts} start(s), exits "
                      f"{self.example.stream.exits}; last lines of its log:")
        report.extend(f"    {line}" for line in self.example.stream.log_tail().splitlines())
        report.append("The SQL that ran (/* connection */), faults as comments:")
        report.append(self.script.render(self.example.setup_sql))
        raise AssertionError("\n".join(report))


def _update(target: sql.Composable, sets: Sequence[sql.Composable], where: sql.Composable
            ) -> sql.Composed:
    return sql.SQL("UPDATE {} SET {} WHERE {}").format(target, sql.SQL(", ").join(sets), where)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def machine_for(world: FuzzWorld, engine: str, *, native: bool = False,
                converge_timeout_s: float = 120.0, engine_snapshot: bool = False
                ) -> type[RosettaMachine]:
    return type(f"Rosetta{engine.capitalize()}Machine", (RosettaMachine,),
                {"world": world, "engine": engine, "native": native,
                 "converge_timeout_s": converge_timeout_s, "engine_snapshot": engine_snapshot,
                 "stats": {}, "divergences": []})
