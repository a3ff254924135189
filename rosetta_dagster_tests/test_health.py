"""The checklist's success criteria as checks, on a real replica streamed by the real engine:
healthy, then each condition forced; `rosetta validate` on a healthy and a broken deployment."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import yaml

from rosetta_dagster.core.config_store import ConfigStore, PipelineState, PipelineStatus
from rosetta_dagster.core.health import (
    CheckOutcome,
    evaluate_config_store,
    evaluate_pipeline,
    replication_lag,
)
from rosetta_dagster.core.lag import LagReading
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineDefinition, load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
)

FAST = OperationsSettings(parity_window_seconds=1, parity_chunk_rows=100)


@pytest.fixture
def replica(pg_cluster: LocalPostgresCluster, pg_root: Path, store: ConfigStore
            ) -> Iterator[tuple[StreamingEnv, PipelineDefinition]]:
    """`public.items` (1,000 rows) streaming into the replica while the test runs."""
    env = new_streaming_env(pg_cluster, pg_root)
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text, n numeric)",
            "INSERT INTO public.items SELECT g, 'v' || g, g / 3.0 FROM generate_series(1, 1000) g")
    pipeline = env.pipeline("checked", ["public.items"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("checked", PipelineStatus.START)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: env.converged("public.items"), message="the snapshot")
        wait_until(lambda: store.get_pipeline("checked").source_position_at is not None, 20,
                   "a heartbeat with the source position")
        yield env, pipeline
    shutil.rmtree(env.offsets_dir, ignore_errors=True)
    # Slot names are per cluster: free this one for the next test's replica.
    inactive = "SELECT active FROM pg_replication_slots WHERE slot_name = 'rosetta_checked'"
    wait_until(lambda: fetch(env.source_url, inactive) == [(False,)], 60, "the slot's release")
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_checked')")


def _outcomes(pipeline: PipelineDefinition, store: ConfigStore,
              operations: OperationsSettings = FAST) -> dict[str, CheckOutcome]:
    stored = store.get_pipeline(pipeline.name)
    return {o.name: o for _, o in evaluate_pipeline(pipeline, stored, operations,
                                                    failures=store.recent_failures(pipeline.name))}


def test_every_check_passes_on_a_healthy_replica(replica: tuple[StreamingEnv, PipelineDefinition],
                                                store: ConfigStore) -> None:
    _, pipeline = replica
    outcomes = _outcomes(pipeline, store)
    assert set(outcomes) == {"stream_health", "slot_active", "retained_wal", "row_count_parity",
                             "content_parity", "replication_lag", "apply_errors", "parked_events"}
    failed = {name: o.description for name, o in outcomes.items() if not o.passed}
    assert failed == {}
    # 10 full chunks and the (empty) tail, where extra destination rows would show
    assert outcomes["content_parity"].metadata == {"value": 0, "threshold": 0,
                                                   "chunks_compared": 11, "rows_compared": 1000}
    # Every outcome carries the measured value and its threshold(s), for the UI's plots.
    for outcome in outcomes.values():
        assert "value" in outcome.metadata, outcome.name
        assert any(k.endswith("threshold") for k in outcome.metadata), outcome.name
    assert outcomes["row_count_parity"].metadata["source_rows"] == 1000
    assert outcomes["retained_wal"].metadata["critical_threshold"] == 500 * 1024 * 1024


def test_each_forced_condition_fails_at_its_severity(
    replica: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    env, pipeline = replica
    # A row changed behind the stream's back: content parity names the key range.
    execute(env.destination_url, "UPDATE replica.items SET v = 'tampered' WHERE id = 456")
    outcomes = _outcomes(pipeline, store)
    content = outcomes["content_parity"]
    assert (content.passed, content.severity) == (False, "ERROR")
    assert content.description == (
        "Rows differ in key range [401, 500]; first differing key 456. Repair: rosetta backfill "
        "request checked public.items --key-range id 401 500")
    assert (content.metadata["first_differing_keys"], content.metadata["range_start"],
            content.metadata["range_end"]) == ("456", "401", "500")
    assert outcomes["row_count_parity"].passed

    execute(env.destination_url, "DELETE FROM replica.items WHERE id = 7")
    counts = _outcomes(pipeline, store)["row_count_parity"]
    assert (counts.passed, counts.severity) == (False, "ERROR")
    assert counts.metadata["difference"] == -1

    # Retained WAL above lowered thresholds: WARN, then ERROR.
    wal = {o.name: o for _, o in evaluate_pipeline(
        pipeline, store.get_pipeline("checked"),
        dataclasses.replace(FAST, wal_warning_mb=0))}["retained_wal"]
    assert (wal.passed, wal.severity) == (False, "WARN")

    # Lag: the oldest pending commit is old (measured for real in test_lag.py).
    stored = store.get_pipeline("checked")
    lag = replication_lag(stored, FAST, LagReading(90.0, 4096, pending_transactions=3))
    assert (lag.passed, lag.severity, lag.metadata["warning_threshold"]) == (False, "WARN", 60)
    assert lag.metadata["lag_bytes"] == 4096
    assert replication_lag(stored, FAST, LagReading(3600.0, 1)).severity == "ERROR"
    unknown = replication_lag(stored, FAST, LagReading(None, 10, note="lag not measured: x"))
    assert (unknown.passed, unknown.severity) == (False, "WARN")

    # The stream failed: ERROR while it does not stream (not an apply error: nothing was
    # refused); WARN with the failure as context once it streams again; ERROR again when it
    # fails about once a minute, even while it runs between failures.
    store.record_pipeline_state("checked", PipelineState.ERROR, error="stream stopped: gone")
    failed = _outcomes(pipeline, store)
    health = failed["stream_health"]
    assert (health.passed, health.severity) == (False, "ERROR")
    assert "should stream and does not: its state is ERROR" in health.description
    assert "stream stopped: gone" in health.description
    assert failed["apply_errors"].passed
    store.record_pipeline_state("checked", PipelineState.RUNNING)
    health = _outcomes(pipeline, store)["stream_health"]
    assert (health.passed, health.severity) == (False, "WARN")
    assert "recovered at" in health.description and "1 failure(s) in the last hour" in (
        health.description)
    assert health.metadata["failures_last_hour"] == 1
    for _ in range(4):
        store.record_pipeline_state("checked", PipelineState.ERROR, error="again")
    store.record_pipeline_state("checked", PipelineState.RUNNING)
    health = _outcomes(pipeline, store)["stream_health"]
    assert (health.passed, health.severity) == (False, "ERROR")
    assert "keeps failing: 5 failures in the last 5 minutes" in health.description


def _pool_outcomes(store: ConfigStore) -> dict[str, CheckOutcome]:
    return {o.name: o for o in evaluate_config_store(store, OperationsSettings())}


def test_pool_checks_see_killed_connections_saturation_and_retries(
    store: ConfigStore, database_url: str, dedicated_cluster: LocalPostgresCluster
) -> None:
    assert all(o.passed for o in _pool_outcomes(store).values())

    # Killed connections: the pool detects them on the next checkout.
    with store.pool.connection() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        store_pid = cursor.fetchone()[0]
    execute(database_url, f"SELECT pg_terminate_backend({int(store_pid)})")
    store.list_pipelines()  # dead connection detected, replaced
    closed = _pool_outcomes(store)["closed_connection_errors"]
    assert (closed.passed, closed.severity) == (False, "ERROR")  # >= 1 in the last minute
    execute(database_url, "UPDATE pool_events SET created_at = now() - interval '10 minutes'")
    closed = _pool_outcomes(store)["closed_connection_errors"]
    assert (closed.passed, closed.severity, closed.metadata["value"]) == (False, "WARN", 1)

    # A pool that needed a retry to initialise (its database started late) is reported.
    dedicated_cluster.stop()
    threading.Timer(1.0, dedicated_cluster.start).start()
    late = ResilientConnectionPool(dedicated_cluster.dsn(), PoolSettings.from_env(max_conn=1),
                                   sleep=lambda s: time.sleep(min(s, 2.0))).open()
    try:
        assert late.stats().init_attempts >= 2
        events = late.take_unreported_events()
        assert ("init_retried", late.stats().init_attempts - 1) in events
    finally:
        late.close()


def test_pool_utilisation_judges_each_pool_and_server_connections_each_server(
    dedicated_cluster: LocalPostgresCluster, pg_cluster: LocalPostgresCluster, pg_root: Path,
) -> None:
    """Sessions of other processes do not make one pool busy; a pool of 10 with 9, then 10,
    in use at once is WARN, then ERROR (the checklist's "> 8" and "> 9" of 10). Sessions
    against max_connections are judged per server: config_db here, the pipeline's source and
    destination on the shared cluster (one server, read once)."""
    url = dedicated_cluster.create_database("config_db")
    pipeline = new_streaming_env(pg_cluster, pg_root).pipeline("counted", ["public.t"])
    pool = ResilientConnectionPool(url, PoolSettings(max_conn=10, application_name="rosetta t"))
    store = ConfigStore(pool.open())
    store.upgrade()

    def outcomes() -> dict[str, CheckOutcome]:
        return {o.name: o for o in evaluate_config_store(store, OperationsSettings(), [pipeline])}

    others = [psycopg2.connect(url) for _ in range(9)]  # e.g. nine streams' own pools
    try:
        healthy = outcomes()
        assert healthy["pool_utilisation"].passed, healthy["pool_utilisation"]
        servers = healthy["server_connections"]
        assert servers.passed and servers.metadata["servers"] == 2, servers
        assert "config_db (127.0.0.1:" in servers.description
        assert "source src (127.0.0.1:" in servers.description

        # Another pool of this process (a stream's, say), reported with the store's own.
        busy_pool = ResilientConnectionPool(
            url, PoolSettings(max_conn=10, application_name="rosetta stream busy")).open()
        held = [busy_pool.getconn() for _ in range(9)]
        store.flush_pool_events([busy_pool])
        busy = outcomes()["pool_utilisation"]
        assert (busy.passed, busy.severity, busy.metadata["value"]) == (False, "WARN", 90.0), busy
        assert "config_db of rosetta stream busy" in busy.description
        assert "9 of 10" in busy.description
        held.append(busy_pool.getconn())
        store.flush_pool_events([busy_pool])
        assert outcomes()["pool_utilisation"].severity == "ERROR"
        for conn in held:
            busy_pool.putconn(conn)
        busy_pool.close()
    finally:
        for conn in others:
            conn.close()

    # The server's max_connections lowered close to what is in use: WARN at 80 %, ERROR at 95 %.
    execute(url, "ALTER SYSTEM SET max_connections = 20")
    dedicated_cluster.restart()
    others = [psycopg2.connect(url) for _ in range(15)]
    try:
        near = outcomes()["server_connections"]  # 15 + the store's own session(s): >= 16 of 20
        assert (near.passed, near.severity) == (False, "WARN"), near
        assert near.metadata["max_connections"] == 20 and "config_db" in near.description
        others += [psycopg2.connect(url) for _ in range(19 - near.metadata["sessions"])]
        full = outcomes()["server_connections"]
        assert (full.passed, full.severity) == (False, "ERROR"), full
    finally:
        for conn in others:
            conn.close()
        pool.close()


def _validate(env: StreamingEnv, config_url: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rosetta_dagster.cli", "validate"],
        env={**env.pipeline_env(path, config_url)}, capture_output=True, text=True, timeout=120,
    )


def test_rosetta_validate_passes_a_healthy_deployment_and_fails_a_broken_one(
    replica: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore, database_url: str,
    tmp_path: Path,
) -> None:
    env, _ = replica
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "checked", ["public.items"],
                                   streaming={"heartbeat_interval_ms": 1000})
    document = yaml.safe_load(path.read_text())
    document["operations"] = {"parity_window_seconds": 1, "parity_chunk_rows": 100}
    path.write_text(yaml.safe_dump(document))
    assert load_config(path, {"TEST_PG_PASSWORD": "x"}).operations.parity_window_seconds == 1

    healthy = _validate(env, database_url, path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    for section in ("=== Connection Pool Health ===", "Connection pool initialized successfully",
                    "=== Active Pipelines ===", "checked\tSTART\tRUNNING",
                    "=== Database Connections ===", "=== Offset cleanup history ===",
                    "PASS       destination/dst/replica/items content_parity",
                    "PASS       config_db pool_utilisation: The busiest of",
                    "PASS       config_db server_connections: Sessions per server: ", "OK"):
        assert section in healthy.stdout, (section, healthy.stdout)

    execute(env.destination_url, "UPDATE replica.items SET n = -1 WHERE id = 999")
    broken = _validate(env, database_url, path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert ("FAIL ERROR destination/dst/replica/items content_parity: Rows differ in key range "
            "[901, 1000]; first differing key 999. Repair: rosetta backfill request checked "
            "public.items --key-range id 901 1000") in broken.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "rosetta_dagster.cli", "validate", "--json"],
        env={**env.pipeline_env(path, database_url)}, capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 1
    report = yaml.safe_load(as_json.stdout)  # JSON is YAML
    assert report["ok"] is False
    assert env.cluster.password not in as_json.stdout + broken.stdout


def test_the_definitions_expose_the_checks_on_the_expected_assets(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import Definitions

    from rosetta_dagster.definitions import build_definitions

    env = StreamingEnv(pg_cluster, "src", "dst", tmp_path)
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "shop", ["public.orders"])
    monkeypatch.setenv("ROSETTA_CONFIG", str(path))
    definitions = build_definitions()
    Definitions.validate_loadable(definitions)  # what the code server does: every job resolves
    repository = definitions.get_repository_def()
    for job_name in repository.job_names:
        repository.get_job(job_name)
    keys = {(tuple(k.asset_key.path), k.name) for k in repository.asset_checks_defs_by_key}
    table = ("destination", "dst", "replica", "orders")
    assert keys == {
        (("config_db",), "pool_utilisation"), (("config_db",), "closed_connection_errors"),
        (("config_db",), "pool_initialised"), (("config_db",), "server_connections"),
        (table, "row_count_parity"), (table, "content_parity"), (table, "replication_lag"),
        (table, "apply_errors"), (table, "parked_events"),
        (("replication_slot", "shop"), "slot_active"), (("replication_slot", "shop"), "retained_wal"),
        (("replication_slot", "shop"), "stream_health"),
    }
    from dagster import AssetKey

    backfill = repository.assets_defs_by_key[AssetKey(["backfill", "shop"])]
    assert {(spec.name, spec.blocking) for spec in backfill.check_specs} == {
        ("row_count", True), ("retry_attempts", False)}
    assert [s.name for s in repository.schedule_defs] == ["replication_health_checks_schedule"]
    assert repository.get_schedule_def("replication_health_checks_schedule").cron_schedule == \
        "*/5 * * * *"


def test_the_scheduled_check_job_records_results_in_dagster(
    replica: tuple[StreamingEnv, PipelineDefinition], database_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job the schedule launches, executed through Dagster on the streaming replica; the
    checks read the pipeline file the definitions were built from, not $ROSETTA_CONFIG."""
    from dagster import DagsterInstance

    from rosetta_dagster.definitions import build_definitions

    env, _ = replica
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "checked", ["public.items"])
    document = yaml.safe_load(path.read_text())
    document["operations"] = {"parity_window_seconds": 1}
    path.write_text(yaml.safe_dump(document))
    for key, value in env.pipeline_env(path, database_url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ROSETTA_CONFIG", str(tmp_path / "not-this-one.yaml"))
    execute(env.destination_url, "UPDATE replica.items SET v = 'tampered' WHERE id = 3")
    with DagsterInstance.ephemeral() as instance:
        result = build_definitions(path).resolve_job_def(
            "replication_health_checks").execute_in_process(instance=instance, raise_on_error=False)
    evaluations = {(tuple(e.asset_key.path), e.check_name): e
                   for e in result.get_asset_check_evaluations()}
    table = ("destination", "dst", "replica", "items")
    assert evaluations[(table, "content_parity")].passed is False
    assert evaluations[(table, "content_parity")].severity.value == "ERROR"
    assert evaluations[(table, "row_count_parity")].passed is True
    assert evaluations[(("replication_slot", "checked"), "slot_active")].passed is True
    # The stream's pools reported themselves: the busiest had at least one connection in use.
    assert evaluations[(("config_db",), "pool_utilisation")].metadata["value"].value >= 10
    assert evaluations[(("config_db",), "server_connections")].passed is True


def test_backfill_checks_fail_at_their_severity(
    replica: tuple[StreamingEnv, PipelineDefinition]
) -> None:
    from psycopg2 import sql

    from rosetta_dagster.core.health import backfill_retry_attempts, backfill_row_parity
    from rosetta_dagster.core.pipeline_config import TableRef

    assert backfill_retry_attempts(7, 1).passed
    assert (backfill_retry_attempts(7, 2).passed, backfill_retry_attempts(7, 2).severity) == (
        False, "WARN")
    assert backfill_retry_attempts(7, 3).severity == "ERROR"

    env, pipeline = replica
    table = TableRef("public", "items")
    condition = sql.SQL("{} <= %s").format(sql.Identifier("id"))
    assert backfill_row_parity(pipeline, table, condition, [100], window_s=0).passed
    execute(env.destination_url, "DELETE FROM replica.items WHERE id = 5")
    missing = backfill_row_parity(pipeline, table, condition, [100], window_s=0)
    assert (missing.passed, missing.severity) == (False, "ERROR")
    assert missing.description == ("Destination dst has 99 rows matching the job's filter, "
                                   "the source 100.")


def test_a_divergence_is_repaired_by_the_range_backfill_the_check_names(
    replica: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore, database_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The printed command repairs the range; with ``verification: {repair: true}`` the
    scheduled check requests that backfill itself, once, and the failure is notified."""
    import shlex

    from dagster import DagsterInstance, build_sensor_context

    from rosetta_dagster.cli import main
    from rosetta_dagster.core.backfill import BackfillRunner
    from rosetta_dagster.definitions import build_definitions
    from rosetta_dagster.defs.alerts.sensors import build_notification_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    env, pipeline = replica
    # A divergence planted behind the stream's back: a row changed, one gone, and one the
    # source no longer has (deleted there, then put back on the destination).
    execute(env.source_url, "DELETE FROM public.items WHERE id = 480")
    wait_until(lambda: env.converged("public.items"), 30, "the delete")
    execute(env.destination_url, "UPDATE replica.items SET v = 'tampered' WHERE id = 456",
            "DELETE FROM replica.items WHERE id = 470",
            "INSERT INTO replica.items VALUES (480, 'resurrected', 0)")
    outcome = _outcomes(pipeline, store)["content_parity"]
    assert outcome.metadata["first_differing_keys"] == "456; 470; 480"

    # By hand: the one command the check prints.
    command = str(outcome.metadata["repair_command"])
    assert command == "rosetta backfill request checked public.items --key-range id 401 501"
    monkeypatch.setenv("CONFIG_DATABASE_URL", database_url)
    assert main(shlex.split(command)[1:]) == 0
    (by_hand,) = store.list_backfill_jobs(pipeline="checked")
    assert by_hand.filter == [{"column": "id", "operator": "between", "value": ["401", "501"]}]
    store.cancel_backfill_job(by_hand.id)

    # By itself: repair on, a notification channel, the scheduled check job run twice.
    hook: list[dict[str, object]] = []
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "checked", ["public.items"])
    document = yaml.safe_load(path.read_text())
    document["pipelines"]["checked"]["verification"] = {"repair": True}
    document["operations"] = {"parity_window_seconds": 1, "parity_chunk_rows": 100}
    document["notifications"] = {"channels": [{"name": "ops", "url": "${HOOK}"}]}
    path.write_text(yaml.safe_dump(document))
    for key, value in {**env.pipeline_env(path, database_url), "HOOK": _receiver(hook)}.items():
        monkeypatch.setenv(key, value)
    job_def = build_definitions().resolve_job_def("replication_health_checks")
    with DagsterInstance.ephemeral() as instance:
        for _ in range(2):
            result = job_def.execute_in_process(instance=instance, raise_on_error=False)
        evaluation = next(e for e in result.get_asset_check_evaluations()
                          if e.check_name == "content_parity")
        (repair,) = [j for j in store.list_backfill_jobs(pipeline="checked") if j.id != by_hand.id]
        assert evaluation.passed is False and evaluation.description.endswith(
            f"Repair already requested: backfill job {repair.id}.")
        assert repair.filter == by_hand.filter and repair.table_name == "public.items"
        sensor = build_notification_sensor([ReplicationSet.of(load_config(path))], outbox_retry_s=0)
        resources = {"config_store": ConfigStoreResource(database_url=database_url)}
        with build_sensor_context(instance=instance, resources=resources) as context:
            cursor = sensor(context).cursor
        assert any("content_parity" in str(post["text"]) and f"backfill job {repair.id}"
                   in str(post["text"]) for post in hook), hook

        BackfillRunner(pipeline, store, repair.id, chunk_timeout_s=60).run()
        wait_until(lambda: env.converged("public.items"), 60, "the repaired range")
        result = job_def.execute_in_process(instance=instance, raise_on_error=False)
        assert next(e for e in result.get_asset_check_evaluations()
                    if e.check_name == "content_parity").passed
        with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
            sensor(context)
        assert hook[-1]["status"] == "resolved"
    assert [j.id for j in store.list_backfill_jobs(pipeline="checked")
            if j.id != by_hand.id] == [repair.id]  # once per range


def _receiver(posts: list[dict[str, object]]) -> str:
    """A local webhook endpoint recording what it receives; returns its URL."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hook"
