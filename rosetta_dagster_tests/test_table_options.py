"""Per-table options against real PostgreSQL and both engines: a column list, a row filter and
a target name per table, in the publication and in every load, backfill and check; changed
options converging without a new snapshot; fan-out to two destinations across a crash."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.health import evaluate_pipeline
from rosetta_dagster.core.pipeline_config import (
    OperationsSettings,
    PipelineDefinition,
    TableOptions,
    TableRef,
)
from rosetta_dagster.core.publication import ensure_publication
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.table_schema import SchemaError
from rosetta_dagster.harness import (
    BackgroundWriter,
    StreamingEnv,
    count_rows,
    execute,
    fetch,
    replica_tables,
    streaming,
    wait_until,
)

ORDERS = (
    "CREATE TABLE public.orders (id int PRIMARY KEY, customer_id int NOT NULL, total numeric, "
    "status text NOT NULL, region text NOT NULL, secret text, note text, updated_at timestamptz)",
    # The row filter reads status and region: UPDATEs and DELETEs are published only when the
    # replica identity covers them.
    "CREATE UNIQUE INDEX orders_identity ON public.orders (id, status, region)",
    "ALTER TABLE public.orders REPLICA IDENTITY USING INDEX orders_identity",
    "CREATE TABLE public.customers (id int PRIMARY KEY, name text)",
    "INSERT INTO public.customers SELECT g, 'customer ' || g FROM generate_series(1, 50) g",
)
STATUSES = ("draft", "open", "paid")
REGIONS = ("EU", "US")
# Values as hostile as real data, in the replicated columns and in the left-out one.
NOTES = ("it's", "back\\slash", "line\nbreak", "tab\there", "emoji 🦀", "", None, '"quoted"')
TOTALS = ("0", "-0", "NaN", "Infinity", "-Infinity", "12345678901234567890.000000001", None)
TIMES = ("infinity", "-infinity", "4713-01-01 00:00:00+00 BC", "2026-11-30 12:00:00.123456+00",
         None)
WHERE = "status <> 'draft' AND region = 'EU'"
COLUMNS = ["id", "customer_id", "total", "status", "region", "note", "updated_at"]


# Every change of public.orders on the source, in order, with its transaction.
_AUDIT = (
    "CREATE TABLE public.audit (n bigserial PRIMARY KEY, xid bigint, op text, id int, old text, "
    "new text)",
    "CREATE FUNCTION public.audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO public.audit (xid, op, id, old, new) VALUES (txid_current(), TG_OP, "
    "coalesce(NEW.id, OLD.id), CASE WHEN TG_OP <> 'INSERT' THEN ROW(OLD.*)::text END, "
    "CASE WHEN TG_OP <> 'DELETE' THEN ROW(NEW.*)::text END); RETURN NULL; END $$",
    "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.orders FOR EACH ROW "
    "EXECUTE FUNCTION public.audit()",
)


def _row(rng: random.Random, key: int) -> tuple[Any, ...]:
    return (key, rng.randint(1, 50), rng.choice(TOTALS), rng.choice(STATUSES),
            rng.choice(REGIONS), f"secret {key}", rng.choice(NOTES), rng.choice(TIMES))


def _seed(env: StreamingEnv, rows: int = 600) -> None:
    execute(env.source_url, *ORDERS)
    rng = random.Random(7)
    conn = psycopg2.connect(env.source_url)
    with conn, conn.cursor() as cursor:
        cursor.executemany("INSERT INTO public.orders VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                           [_row(rng, key) for key in range(1, rows + 1)])
    conn.close()


class _Writer(BackgroundWriter):
    """Random transactions on public.orders until stopped: inserts, updates that move rows into
    and out of the filter, updates of the left-out column only, other updates, deletes."""

    def __init__(self, url: str, seed: int, first_key: int) -> None:
        self.url, self.rng, self.next_key = url, random.Random(seed), first_key
        self.transactions = 0
        super().__init__()

    def write(self) -> None:
        conn = psycopg2.connect(self.url)
        rng = self.rng
        while not self.stopping:
            with conn, conn.cursor() as cursor:
                for _ in range(rng.randint(1, 5)):
                    key = rng.randint(1, self.next_key - 1)
                    kind = rng.random()
                    if kind < 0.2:
                        cursor.execute("INSERT INTO public.orders VALUES "
                                       "(%s, %s, %s, %s, %s, %s, %s, %s)",
                                       _row(rng, self.next_key))
                        self.next_key += 1
                    elif kind < 0.45:  # into or out of the filter
                        cursor.execute("UPDATE public.orders SET status = %s, region = %s "
                                       "WHERE id = %s", (rng.choice(STATUSES),
                                                         rng.choice(REGIONS), key))
                    elif kind < 0.6:  # only the column the options leave out
                        cursor.execute("UPDATE public.orders SET secret = md5(random()::text) "
                                       "WHERE id = %s", (key,))
                    elif kind < 0.85:
                        cursor.execute("UPDATE public.orders SET total = %s, note = %s, "
                                       "updated_at = %s WHERE id = %s",
                                       (rng.choice(TOTALS), rng.choice(NOTES),
                                        rng.choice(TIMES), key))
                    else:
                        cursor.execute("DELETE FROM public.orders WHERE id = %s", (key,))
            self.transactions += 1
            time.sleep(0.005)
        conn.close()


def _projection(url: str, relation: str, columns: list[str], where: str = "TRUE"
                ) -> tuple[int, str]:
    """Row count and an ordered checksum of the rows' text under pinned settings."""
    schema, name = relation.split(".")
    conn = psycopg2.connect(url, options="-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres "
                                         "-c extra_float_digits=3 -c bytea_output=hex")
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(md5(ROW({cols})::text), '' ORDER BY id)), "
                "'') FROM {rel} WHERE {where}").format(
                    cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
                    rel=sql.Identifier(schema, name), where=sql.SQL(where)))
            count, digest = cursor.fetchone()  # type: ignore[misc]
    except psycopg2.errors.UndefinedTable:
        return -1, ""
    finally:
        conn.close()
    return int(count), str(digest)


def _far(env: StreamingEnv) -> tuple[dict[str, object], str]:
    """A second destination database (schema mirror) on the env's destination cluster."""
    database = f"far_{env.destination_db}"
    env.target_cluster.create_database(database)
    return ({"port": env.target_cluster.port, "database": database, "schema": "mirror"},
            env.target_cluster.dsn(database))


def _orders_entry(**changes: object) -> dict[str, object]:
    return {"name": "public.orders", "columns": COLUMNS, "where": WHERE,
            "target": {"dst": "sales.orders_eu", "far": "orders_copy"}, **changes}


def _pipeline(env: StreamingEnv, workdir: Path, name: str, tables: list[Any],
              far: Mapping[str, object] | None = None) -> PipelineDefinition:
    workdir.mkdir(parents=True, exist_ok=True)
    path = env.write_pipeline_file(workdir / "rosetta.yaml", name, tables,
                                   {"heartbeat_interval_ms": 1000},
                                   {"far": far} if far is not None else None)
    return env.load_pipeline(path, name)


def _converged(env: StreamingEnv, far_url: str, columns: list[str], where: str) -> bool:
    source = _projection(env.source_url, "public.orders", columns, where)
    return (_projection(env.destination_url, "sales.orders_eu", columns) == source
            == _projection(far_url, "mirror.orders_copy", columns))


def test_a_column_list_row_filter_and_targets_replicate_the_projection_under_a_writer(
    env: StreamingEnv, pg_root: Path, store: ConfigStore
) -> None:
    _seed(env)
    execute(env.source_url, *_AUDIT)  # explains a difference, should one appear
    far, far_url = _far(env)
    pipeline = _pipeline(env, pg_root / f"opts-{env.source_db}", "opts",
                         ["public.customers", _orders_entry()], far)
    store.sync_pipeline(pipeline)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        # The initial load copies the projection only.
        wait_until(lambda: _converged(env, far_url, COLUMNS, WHERE), 60, "the initial load")
        with _Writer(env.source_url, 11, 601) as writer:
            time.sleep(4)
        assert writer.transactions > 50
        try:
            wait_until(lambda: _converged(env, far_url, COLUMNS, WHERE), 60, "the stream")
        except AssertionError as exc:
            differences = _differences(env, far_url)
            keys = sorted({k for rows in differences.values() for k, *_ in rows})  # type: ignore[attr-defined]
            history = fetch(env.source_url, "SELECT n, xid, op, id, old, new FROM public.audit "
                            "WHERE id = ANY(%s) ORDER BY n", (keys,))
            raise AssertionError(f"{exc}: {differences}; source history: {history}") from None
        inside = _projection(env.source_url, "public.orders", COLUMNS, WHERE)[0]
        # rows outside the filter exist, and are not replicated
        assert count_rows(env.source_url, "public.orders") > inside + 100
        for url, relation in ((env.destination_url, "sales.orders_eu"),
                              (far_url, "mirror.orders_copy")):
            schema, name = relation.split(".")
            assert [r[0] for r in fetch(url, "SELECT attname FROM pg_attribute WHERE attrelid = "
                                        "%s::regclass AND attnum > 0 ORDER BY attnum",
                                        (relation,))] == COLUMNS  # no secret
        assert env.converged("public.customers")  # a table without options: whole
        assert count_rows(env.destination_url, "replica.orders") == -1  # only the target
        # The parity checks compare the same projection: green on a filtered replica.
        outcomes = {(target.label, outcome.name): outcome for target, outcome in evaluate_pipeline(
            pipeline, store.get_pipeline("opts"), OperationsSettings(parity_window_seconds=5))}
    for label in ("destination/dst/sales/orders_eu", "destination/far/mirror/orders_copy",
                  "destination/dst/replica/customers"):
        for check in ("row_count_parity", "content_parity"):
            assert outcomes[(label, check)].passed, outcomes[(label, check)]


def _differences(env: StreamingEnv, far_url: str) -> dict[str, object]:
    def rows(url: str, schema: str, name: str, where: str = "TRUE") -> dict[Any, Any]:
        return dict(fetch(url, sql.SQL("SELECT id, ROW({})::text FROM {} WHERE {}").format(  # type: ignore[arg-type]
            sql.SQL(", ").join(map(sql.Identifier, COLUMNS)), sql.Identifier(schema, name),
            sql.SQL(where))))

    source = rows(env.source_url, "public", "orders", WHERE)
    found = {}
    for label, url, relation in (("dst", env.destination_url, "sales.orders_eu"),
                                 ("far", far_url, "mirror.orders_copy")):
        target = rows(url, *relation.split("."))
        found[label] = [(k, source.get(k), target.get(k)) for k in sorted(source.keys() | target.keys())
                        if source.get(k) != target.get(k)][:5]
    return found


def _started(store: ConfigStore, pipeline: PipelineDefinition) -> PipelineDefinition:
    """``pipeline`` in the config store with status START (backfills need a started stream)."""
    store.sync_pipeline(pipeline)
    store.set_pipeline_status(pipeline.name, PipelineStatus.START)
    return pipeline


def _wait_equal(env: StreamingEnv, relation: str, columns: list[str], what: str) -> None:
    """Until destination table ``relation`` equals public.orders projected on ``columns``."""
    wait_until(lambda: _projection(env.destination_url, relation, columns)
               == _projection(env.source_url, "public.orders", columns), 60, what)


def _job_ids(store: ConfigStore, pipeline: str) -> set[int]:
    return {job.id for job in store.list_backfill_jobs(pipeline=pipeline)}


def _run_the_requested_backfill(store: ConfigStore, pipeline: PipelineDefinition,
                                known: set[int], chunk_rows: int = 50_000) -> None:
    """Wait for the one backfill of public.orders the stream requests (ids not in ``known``)
    and run it, as the backfill sensor's run would."""
    wait_until(lambda: _job_ids(store, pipeline.name) != known, 60,
               "the stream to request a backfill")
    (job,) = [j for j in store.list_backfill_jobs(pipeline=pipeline.name) if j.id not in known]
    assert job.table_name == "public.orders" and not job.filter
    BackfillRunner(pipeline, store, job.id, chunk_timeout_s=60, chunk_rows=chunk_rows).run()


def test_changing_the_filter_and_columns_of_a_streaming_table_converges_without_a_snapshot(
    env: StreamingEnv, pg_root: Path, store: ConfigStore
) -> None:
    _seed(env)
    far, far_url = _far(env)
    workdir = pg_root / f"change-{env.source_db}"
    before = _pipeline(env, workdir, "change", ["public.customers", _orders_entry()], far)
    _started(store, before)
    with streaming(StreamingSession(before, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: _converged(env, far_url, COLUMNS, WHERE), 60, "the first projection")
        env.wait_for_stored_position(before)
    # Behind the stream's back, a row only a new snapshot of customers would remove.
    execute(env.destination_url, "INSERT INTO replica.customers VALUES (-1, 'kept')")
    # Another filter (some rows come in, others go), customer_id left out, secret added.
    new_where = "status = 'paid' OR region = 'US'"
    new_columns = ["id", "total", "status", "region", "secret", "note", "updated_at"]
    after = _pipeline(env, workdir, "change", ["public.customers", _orders_entry(
        columns=new_columns, where=new_where)], far)
    known = _job_ids(store, "change")
    session = StreamingSession(after, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        with _Writer(env.source_url, 12, 601):
            _run_the_requested_backfill(store, after, known, chunk_rows=150)
            time.sleep(1)
        # The stream applies the writer's last changes: waited for while it still runs.
        try:
            wait_until(lambda: _converged(env, far_url, new_columns, new_where), 60,
                       "the new projection")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {_projection(env.source_url, 'public.orders', new_columns, new_where)} "
                f"{_projection(env.destination_url, 'sales.orders_eu', new_columns)}") from None
    # The left-out column stays in place; no snapshot of the pipeline was taken.
    assert fetch(env.destination_url, "SELECT count(*) FROM pg_attribute WHERE attrelid = "
                 "'sales.orders_eu'::regclass AND attname = 'customer_id'") == [(1,)]
    assert fetch(env.destination_url, "SELECT name FROM replica.customers WHERE id = -1") == [
        ("kept",)]


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_new_target_for_a_streaming_table_is_loaded_by_a_backfill(
    env: StreamingEnv, pg_root: Path, store: ConfigStore
) -> None:
    _seed(env, rows=300)
    workdir = pg_root / f"retarget-{env.source_db}"
    entry = {"name": "public.orders", "target": "orders_v1"}
    before = _pipeline(env, workdir, "retarget", ["public.customers", entry])
    _started(store, before)
    columns = [*COLUMNS, "secret"]
    with streaming(StreamingSession(before, offsets_dir=env.offsets_dir, config_store=store)):
        _wait_equal(env, "replica.orders_v1", columns, "orders_v1")
        env.wait_for_stored_position(before)
    after = _pipeline(env, workdir, "retarget", ["public.customers", {**entry,
                                                                       "target": "orders_v2"}])
    known = _job_ids(store, "retarget")
    with streaming(StreamingSession(after, offsets_dir=env.offsets_dir, config_store=store)):
        with _Writer(env.source_url, 13, 301):
            _run_the_requested_backfill(store, after, known, chunk_rows=100)
            time.sleep(1)
        _wait_equal(env, "replica.orders_v2", columns, "orders_v2")  # while it streams
    assert count_rows(env.destination_url, "replica.orders_v1") > 0  # left as it was


def test_a_column_added_on_the_source_under_exclude_columns_is_filled_at_the_next_start(
    env: StreamingEnv, pg_root: Path, store: ConfigStore
) -> None:
    """The publication's column list is explicit: a new source column is not sent until the
    next start, which widens the list and fills the column by a backfill."""
    _seed(env, rows=200)
    workdir = pg_root / f"widen-{env.source_db}"
    pipeline = _pipeline(env, workdir, "widen",
                         [{"name": "public.orders", "exclude_columns": ["secret"]}])
    _started(store, pipeline)
    widened = [*COLUMNS, "extra"]
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        _wait_equal(env, "replica.orders", COLUMNS, "the load")
        execute(env.source_url, "ALTER TABLE public.orders ADD COLUMN extra text",
                "UPDATE public.orders SET extra = 'x' || id, total = 1 WHERE id % 3 = 0")
        _wait_equal(env, "replica.orders", COLUMNS, "the updates")
    known = _job_ids(store, "widen")
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        _run_the_requested_backfill(store, pipeline, known)
        execute(env.source_url, "UPDATE public.orders SET extra = 'y' WHERE id = 1")
        _wait_equal(env, "replica.orders", widened, "extra filled")


@pytest.mark.parametrize(
    ("setup", "entry", "expected"),
    [
        ("", {"columns": ["id", "nope"]},
         "Table public.t: its columns option names nope, which source src does not have, so "
         "nothing was written."),
        ("", {"where": "v > random()"},
         "Table public.t: source src refuses its options (invalid publication WHERE expression"),
        ("", {"where": "nope = 1"},
         "Table public.t: source src refuses its options (column \"nope\" does not exist)"),
        ("", {"where": "v = 1"},
         "Table public.t: its where option reads v, which the table's replica identity (id) does "
         "not cover, so PostgreSQL would refuse every UPDATE and DELETE of the table"),
        ("ALTER TABLE public.t REPLICA IDENTITY FULL", {"exclude_columns": ["note"]},
         "Table public.t: its column list leaves out note, which belong to the table's replica "
         "identity (FULL: every column)"),
    ],
    ids=["unknown_column", "volatile_function", "unknown_filter_column", "filter_outside_identity",
         "column_list_outside_identity"],
)
def test_options_postgresql_would_refuse_are_refused_before_anything_is_created(
    env: StreamingEnv, pg_root: Path, setup: str, entry: dict[str, object], expected: str
) -> None:
    execute(env.source_url, "CREATE TABLE public.t (id int PRIMARY KEY, v int, note text)",
            "CREATE TABLE public.u (id int PRIMARY KEY)", *([setup] if setup else []))
    pipeline = _pipeline(env, pg_root / f"bad-{env.source_db}", "bad",
                         ["public.u", {"name": "public.t", **entry}])
    with pytest.raises(SchemaError) as raised:
        StreamingSession(pipeline, offsets_dir=env.offsets_dir).prepare()
    assert expected in str(raised.value)
    assert str(raised.value).endswith("so nothing was written.")
    assert not fetch(env.source_url, "SELECT pubname FROM pg_publication")
    assert not fetch(env.source_url, "SELECT slot_name FROM pg_replication_slots WHERE "
                     "database = current_database()")
    assert replica_tables(env) == 0


def test_a_source_older_than_15_is_refused_when_options_are_used() -> None:
    table = TableRef("public", "t")
    pipeline = PipelineDefinition(
        name="old", source=SimpleNamespace(name="src"), destinations=(), tables=(table,),  # type: ignore[arg-type]
        table_options=((table, TableOptions(where="id > 0")),))
    with pytest.raises(SchemaError, match=r"^Pipeline old gives public.t column lists or row "
                       r"filters, which need PostgreSQL 15 or newer on source src \(it runs 14\)"):
        ensure_publication(SimpleNamespace(server_version=140011), pipeline, {}, print)  # type: ignore[arg-type]


# -- fan-out across a crash ------------------------------------------------------------------

# Counts every row written into a destination table: a change applied twice shows as 2.
_COUNTER = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE {schema}.events (id bigint PRIMARY KEY, payload text);
CREATE TABLE {schema}.applied (id bigint PRIMARY KEY, times int NOT NULL);
CREATE FUNCTION {schema}.count_application() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.applied VALUES (NEW.id, 1)
    ON CONFLICT (id) DO UPDATE SET times = {schema}.applied.times + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER count_application AFTER INSERT OR UPDATE ON {schema}.events
    FOR EACH ROW EXECUTE FUNCTION {schema}.count_application();
"""


def _stream(env: StreamingEnv, workdir: Path, far: Mapping[str, object], config_url: str
            ) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = env.write_pipeline_file(workdir / "rosetta.yaml", "fan", ["public.events"],
                                   {"heartbeat_interval_ms": 1000}, {"far": far})
    environment = {**env.pipeline_env(path, config_url), "ROSETTA_OFFSETS_DIR": "tmp/offsets"}
    return subprocess.Popen([sys.executable, "-m", "rosetta_dagster.cli", "stream", "fan"],
                            cwd=workdir, env=environment,
                            stdout=(workdir / "stream.log").open("ab"), stderr=subprocess.STDOUT)


def test_fan_out_converges_across_a_crash_between_two_destinations_commits(
    env: StreamingEnv, pg_root: Path, engine: str
) -> None:
    """Destination dst has committed a batch that far has not (far's table is locked) when
    the stream is killed; the next stream, on another working directory, brings both level."""
    execute(env.source_url, "CREATE TABLE public.events (id bigint PRIMARY KEY, payload text)",
            "INSERT INTO public.events SELECT g, 'initial' FROM generate_series(1, 500) g")
    far, far_url = _far(env)
    execute(env.destination_url, _COUNTER.format(schema="replica"))
    execute(far_url, _COUNTER.format(schema="mirror"))
    config_db = f"cfg_{env.source_db}"
    env.cluster.create_database(config_db)
    streams: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    written = [500]

    def write() -> None:
        conn = psycopg2.connect(env.source_url)
        conn.autocommit = True
        with conn.cursor() as cursor:
            while not stop.is_set():
                written[0] += 1
                cursor.execute("INSERT INTO public.events VALUES (%s, %s)",
                               (written[0], f"row {written[0]} 🦀 'q' \\ \n"))
                time.sleep(0.003)
        conn.close()

    def level() -> bool:
        source = fetch(env.source_url, "SELECT count(*), sum(hashtext(payload)) FROM public.events")
        return (fetch(env.destination_url, "SELECT count(*), sum(hashtext(payload)) FROM "
                      "replica.events") == source
                == fetch(far_url, "SELECT count(*), sum(hashtext(payload)) FROM mirror.events"))

    writer = threading.Thread(target=write, daemon=True)
    locker = psycopg2.connect(far_url)
    try:
        streams.append(_stream(env, pg_root / f"fan-a-{env.source_db}", far,
                               env.cluster.dsn(config_db)))
        wait_until(level, 90, "both destinations loaded")
        writer.start()
        wait_until(lambda: count_rows(far_url, "mirror.events") > 1500, 60, "streaming to far")
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE mirror.events IN ACCESS EXCLUSIVE MODE")
        # dst commits the next batch; far's apply of it waits on the lock.
        wait_until(lambda: fetch(env.target_cluster.dsn(), "SELECT count(*) FROM pg_stat_activity "
                                 "WHERE datname = %s AND wait_event_type = 'Lock'",
                                 (far["database"],))[0][0] == 1, 30, "far's apply to wait")
        streams[0].send_signal(signal.SIGKILL)
        streams[0].wait(10)
        locker.rollback()
        assert count_rows(env.destination_url, "replica.events") > count_rows(
            far_url, "mirror.events")
        shutil.rmtree(pg_root / f"fan-a-{env.source_db}")  # nothing kept on the first host
        streams.append(_stream(env, pg_root / f"fan-b-{env.source_db}", far,
                               env.cluster.dsn(config_db)))
        time.sleep(2)
        stop.set()
        writer.join(10)
        wait_until(level, 90, "both destinations level after the crash")
    finally:
        stop.set()
        locker.close()
        for stream in streams:
            if stream.poll() is None:
                stream.send_signal(signal.SIGTERM)
                stream.wait(30)
    if engine == "pgoutput":  # positions kept per destination: nothing applied twice
        for url, schema in ((env.destination_url, "replica"), (far_url, "mirror")):
            assert fetch(url, sql.SQL("SELECT max(times) FROM {}.applied").format(
                sql.Identifier(schema))) == [(1,)]


def test_a_row_filter_with_a_percent_sign_is_loaded_streamed_backfilled_and_checked(
    env: StreamingEnv, pg_root: Path, store: ConfigStore
) -> None:
    """Found by the fuzzer once its backfills ran: a filter such as ``id % 3 <> 0`` failed in
    every statement executed with parameters (backfill chunks, the parity checks): psycopg2
    read its ``%`` as a placeholder."""
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, note text)",
            "INSERT INTO public.items SELECT g, '100%' FROM generate_series(1, 90) g")
    pipeline = _started(store, _pipeline(env, pg_root / f"percent-{env.source_db}", "percent",
                                         [{"name": "public.items", "where": "id % 3 <> 0"}]))
    replicated = "SELECT count(*), sum(id) FROM public.items WHERE id % 3 <> 0"

    def loaded() -> bool:
        try:
            return fetch(env.destination_url, "SELECT count(*), sum(id) FROM replica.items"
                         ) == fetch(env.source_url, replicated)
        except psycopg2.errors.UndefinedTable:
            return False

    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(loaded, 60, "the initial load")
        execute(env.source_url, "INSERT INTO public.items VALUES (91, '%s'), (93, '%%')")
        execute(env.destination_url, "DELETE FROM replica.items WHERE id = 4")  # restored below
        job = store.create_backfill_job("percent", "public.items")
        result = BackfillRunner(pipeline, store, job.id, chunk_rows=20, chunk_timeout_s=60).run()
        assert result.inserted >= 1
        outcomes = {outcome.name: outcome for _, outcome in evaluate_pipeline(
            pipeline, store.get_pipeline("percent"), OperationsSettings(parity_window_seconds=5))}
    assert fetch(env.destination_url, "SELECT count(*), sum(id) FROM replica.items") == fetch(
        env.source_url, replicated)
    for check in ("row_count_parity", "content_parity"):
        assert outcomes[check].passed, outcomes[check]
