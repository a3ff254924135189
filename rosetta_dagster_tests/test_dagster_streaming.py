"""Operating the streams through a real Dagster instance: `dg dev` with its daemon running
the supervisor, slot-guard and WAL-monitor sensors, real streaming runs, real PostgreSQL.

One instance serves the module (starting it costs ~20 s); the tests run in file order and each
leaves the `orders` pipeline streaming. The `broken` pipeline (unreachable source) is START from
the beginning and must never disturb `orders`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from dagster import EventLogEntry, deserialize_value
from dagster_graphql import DagsterGraphQLClient

from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.health import evaluate_config_store
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.core.pipeline_config import OperationsSettings
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.harness import (
    StreamingEnv,
    execute,
    fetch,
    new_streaming_env,
    wait_until,
)
from rosetta_dagster.local_stack import (
    dagster_dev_command,
    dagster_graphql,
    write_dagster_instance_yaml,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
ACTIVE = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"}
SLOT_ACTIVE = "SELECT active FROM pg_replication_slots WHERE slot_name = 'rosetta_orders'"
FLEET = [f"fleet{i}" for i in range(1, 9)]  # pipelines started together by one test
OPERATIONS = {
    "supervisor_interval_seconds": 5,
    "heartbeat_timeout_seconds": 20,
    "restart_backoff_initial_seconds": 4,
    # `broken` fails from the first minute to the last: a low cap would relaunch it (a run
    # process of seconds of CPU each) a dozen times and slow every other test of the module.
    "restart_backoff_max_seconds": 64,
    "wal_monitor_interval_seconds": 10,
}


@dataclass
class Deployment:
    env: StreamingEnv
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    workdir: Path
    config_url: str
    storage_url: str
    environment: dict[str, str]

    @property
    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.port)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def runs(self, pipeline: str) -> list[tuple[str, str, float, float | None]]:
        """(run id, status, created, ended) of the pipeline's streaming runs, oldest first."""
        rows = fetch(
            self.storage_url,
            "SELECT r.run_id, r.status, extract(epoch FROM r.create_timestamp)::float8, "
            "r.end_time FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
            "WHERE t.key = 'rosetta/pipeline' AND t.value = %s ORDER BY r.create_timestamp",
            (pipeline,),
        )
        return [(str(a), str(b), float(c), None if d is None else float(d))  # type: ignore[arg-type]
                for a, b, c, d in rows]

    def active_runs(self, pipeline: str) -> list[str]:
        return [run_id for run_id, status, _, _ in self.runs(pipeline) if status in ACTIVE]

    def streaming_run(self, pipeline: str) -> str:
        """Wait for exactly one STARTED run whose pipeline reports RUNNING; return its id."""
        def one_running() -> bool:
            runs = [r for r in self.runs(pipeline) if r[1] in ACTIVE]
            state = fetch(self.config_url, "SELECT m.state, m.run_id FROM pipeline_metadata m "
                          "JOIN pipelines p ON p.id = m.pipeline_id WHERE p.name = %s", (pipeline,))
            return (len(runs) == 1 and runs[0][1] == "STARTED"
                    and state == [("RUNNING", runs[0][0])])

        # Generous: under a parallel test run, a run worker can take a while to start.
        try:
            wait_until(one_running, 300, f"one running stream of {pipeline}")
        except AssertionError as exc:  # what the supervisor and the runs did, for a flake
            said = [line for line in self.output().splitlines()
                    if pipeline in line and ("supervisor" in line or "stream" in line)]
            raise AssertionError(f"{exc}\nruns: {self.runs(pipeline)}\n"
                                 + "\n".join(said[-40:])) from None
        return self.active_runs(pipeline)[0]

    def rosetta(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rosetta_dagster.cli", *args],
                              env=self.environment, capture_output=True, text=True, timeout=60,
                              check=True)


def _pipeline_file(env: StreamingEnv, path: Path) -> None:
    cluster = env.cluster
    endpoint = {"host": "127.0.0.1", "port": cluster.port, "user": cluster.superuser,
                "password": "${TEST_PG_PASSWORD}"}
    path.write_text(yaml.safe_dump({
        "sources": {
            "src": {**endpoint, "database": env.source_db},
            # Nothing listens there: every run of `broken` fails at once.
            "unreachable": {**endpoint, "port": find_free_port(), "database": "nowhere"},
        },
        "destinations": {
            "dst": {**endpoint, "database": env.destination_db, "schema": "replica"},
            "dst_broken": {**endpoint, "database": env.destination_db, "schema": "broken"},
        },
        "pipelines": {
            "orders": {"source": "src", "destinations": ["dst"], "tables": ["public.orders"],
                       "streaming": {"heartbeat_interval_ms": 1000}},
            "broken": {"source": "unreachable", "destinations": ["dst_broken"],
                       "tables": ["public.orders"]},
            "ledger": {"source": "src", "destinations": ["dst"], "tables": ["public.ledger"],
                       "streaming": {"engine": "pgoutput", "heartbeat_interval_ms": 1000}},
            # Paused until the test of many pipelines on one instance starts them.
            **{name: {"source": "src", "destinations": ["dst"], "tables": [f"public.{name}"],
                      "streaming": {"engine": "pgoutput", "heartbeat_interval_ms": 1000}}
               for name in FLEET},
        },
        "operations": OPERATIONS,
    }))


@pytest.fixture(scope="module")
def deployment(pg_cluster: LocalPostgresCluster, pg_root: Path) -> Iterator[Deployment]:
    env = new_streaming_env(pg_cluster, pg_root)
    execute(env.source_url,
            "CREATE TABLE public.orders (id int PRIMARY KEY, amount numeric(10,2), note text)",
            "INSERT INTO public.orders SELECT g, g, 'n' FROM generate_series(1, 200) g",
            "CREATE TABLE public.ledger (id int PRIMARY KEY, booked timestamptz, tags text[])",
            "INSERT INTO public.ledger SELECT g, 'infinity', '{{a,b},{c,d}}' "
            "FROM generate_series(1, 100) g",
            *(f"CREATE TABLE public.{name} (id int PRIMARY KEY, v text, at timestamptz); "  # noqa: S608
              f"INSERT INTO public.{name} SELECT g, 'v' || g, now() FROM generate_series(1, 100) g"
              for name in FLEET))
    workdir = pg_root / f"dagster-{env.source_db}"
    workdir.mkdir()
    storage_db, config_db = f"dagster_{env.source_db}", f"config_{env.source_db}"
    pg_cluster.create_database(storage_db)
    pg_cluster.create_database(config_db)
    # The daemon launches queued runs every second (Dagster's default is 5): the module
    # launches some thirty runs.
    write_dagster_instance_yaml(workdir / "home", pg_cluster, storage_db, "TEST_PG_PASSWORD",
                                dequeue_interval_seconds=1)
    pipeline_file = workdir / "rosetta.yaml"
    _pipeline_file(env, pipeline_file)
    config_url = pg_cluster.dsn(config_db)
    environment = {**env.pipeline_env(pipeline_file, config_url),
                   "DAGSTER_HOME": str(workdir / "home"),
                   # Relative, as in the product: the checklist's log line names tmp/offsets/…
                   "ROSETTA_OFFSETS_DIR": "tmp/offsets"}
    with ResilientConnectionPool(config_url, PoolSettings.from_env(max_conn=1)) as pool:
        store = ConfigStore(pool)
        store.upgrade()
        from rosetta_dagster.core.pipeline_config import load_config

        for pipeline in load_config(pipeline_file, resolve_secrets=False).pipelines.values():
            store.sync_pipeline(pipeline)
        store.set_pipeline_status("broken", PipelineStatus.START)
    port = find_free_port()
    log = workdir / "dagster-dev.log"
    process = subprocess.Popen(
        dagster_dev_command(REPO_ROOT / "workspace.yaml", port),
        cwd=workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env=environment,
    )
    deployed = Deployment(env, process, port, log, workdir, config_url,
                          pg_cluster.dsn(storage_db), environment)
    try:
        _wait_loaded(deployed)
        yield deployed
    finally:
        print(deployed.output()[-8000:])  # shown by pytest when a test of the module failed
        # The code servers run in sessions of their own: collected first, killed if they outlive
        # dg dev (one once did, for an hour, after a failed run of the module).
        descendants = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


def _wait_loaded(deployed: Deployment) -> None:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"

    def loaded() -> bool:
        assert deployed.process.poll() is None, deployed.output()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{deployed.port}/server_info", timeout=2)
            entries = dagster_graphql(f"http://127.0.0.1:{deployed.port}", query
                                      )["workspaceOrError"]["locationEntries"]
        except Exception:  # noqa: BLE001 - still starting
            return False
        return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

    wait_until(loaded, 120, "dg dev to load the code location")


def _flows(deployed: Deployment) -> int:
    rows = fetch(deployed.config_url, "SELECT coalesce(sum(f.record_count), 0) FROM "
                 "data_flow_record_monitoring f JOIN pipelines p ON p.id = f.pipeline_id "
                 "WHERE p.name = 'orders' AND f.destination = 'dst'")
    return int(rows[0][0])  # type: ignore[call-overload]


def _supervisor_ticks(deployed: Deployment) -> tuple[int, int]:
    """(ended, under way) evaluations of the supervisor: a tick is stored as STARTED and
    updated when the evaluation ends."""
    rows = fetch(deployed.storage_url, "SELECT count(*) FILTER (WHERE status <> 'STARTED'), "
                 "count(*) FILTER (WHERE status = 'STARTED') FROM job_ticks "
                 "WHERE tick_body LIKE %s", ('%"pipeline_supervisor"%',))
    return int(rows[0][0]), int(rows[0][1])  # type: ignore[call-overload]


def _evaluations(deployed: Deployment) -> None:
    """Let the supervisor evaluate once more from start to end (its chance to act wrongly):
    the evaluations under way now may have read the state before the caller changed it."""
    ended, under_way = _supervisor_ticks(deployed)
    wait_until(lambda: _supervisor_ticks(deployed)[0] >= ended + under_way + 1,
               OPERATIONS["supervisor_interval_seconds"] + 60, "an evaluation of the supervisor")


def test_start_launches_exactly_one_run_pause_terminates_it_and_start_resumes(
    deployment: Deployment,
) -> None:
    env = deployment.env
    wait_until(lambda: "Pipeline manager started with 1 active pipelines" in deployment.output(),
               60, "the supervisor's first evaluation")
    assert deployment.runs("orders") == []

    deployment.rosetta("pipeline", "start", "orders")
    deployment.rosetta("pipeline", "start", "orders")  # twice, quickly: still one run
    first = deployment.streaming_run("orders")
    wait_until(lambda: env.converged("public.orders"), 120, "the initial load through Dagster")
    # The destination table's asset is materialized when its initial load completes.
    (event,) = fetch(deployment.storage_url, "SELECT event FROM event_logs WHERE run_id = %s "
                     "AND dagster_event_type = 'ASSET_MATERIALIZATION'", (first,))
    materialization = deserialize_value(str(event[0]), EventLogEntry).asset_materialization
    assert materialization is not None
    assert materialization.asset_key.path[0] == "destination"
    assert materialization.asset_key.path[-1] == "orders"
    assert materialization.metadata["rows"].value == 200
    assert materialization.metadata["load_mode"].value == "direct"
    execute(env.source_url, "UPDATE public.orders SET note = 'updated' WHERE id <= 20",
            "DELETE FROM public.orders WHERE id > 190")
    wait_until(lambda: env.converged("public.orders"), 180, "streamed changes")
    _evaluations(deployment)
    assert [r[0] for r in deployment.runs("orders")] == [first]

    # Pause through the Dagster job (the launchpad's way); the supervisor terminates the run.
    deployment.client.submit_job_execution(
        "set_pipeline_status",
        run_config={"ops": {"set_pipeline_status_op": {"config": {"pipeline": "orders",
                                                                   "status": "PAUSE"}}}},
    )
    wait_until(lambda: deployment.active_runs("orders") == [], 180, "the paused run to stop")
    assert deployment.runs("orders")[-1][1] == "CANCELED"
    wait_until(lambda: fetch(env.source_url, SLOT_ACTIVE) == [(False,)], 60, "the slot's release")
    assert _flows(deployment) == 230  # 200 snapshot rows + 20 updates + 10 deletes
    execute(env.source_url, "INSERT INTO public.orders VALUES (1000, 1, 'late')",
            "UPDATE public.orders SET amount = 0 WHERE id = 1")
    _evaluations(deployment)
    assert len(deployment.runs("orders")) == 1  # stays gone while paused

    deployment.rosetta("pipeline", "start", "orders")
    second = deployment.streaming_run("orders")
    assert second != first
    wait_until(lambda: env.converged("public.orders"), 120, "the resumed stream")
    # Resumed from the offsets: a snapshot would add 201 rows. At-least-once delivery may
    # replay the last transactions whose commit was not yet confirmed, nothing more. (The
    # batches' counts reach the config store within a second of being applied.)
    wait_until(lambda: _flows(deployment) >= 232, 30, "the resumed batches' counts")
    assert _flows(deployment) <= 262


def _run_worker_pid(deployed: Deployment, run_id: str) -> int:
    """The pid Dagster reports for the process executing the run's steps."""
    rows = fetch(deployed.storage_url,
                 "SELECT event FROM event_logs WHERE run_id = %s AND event LIKE %s",
                 (run_id, "%Executing steps in process (pid: %"))
    match = re.search(r"Executing steps in process \(pid: (\d+)\)", str(rows[0][0]))
    assert match, rows
    return int(match.group(1))


def test_a_killed_run_is_replaced_and_a_hung_run_is_failed_by_its_stale_heartbeat(
    deployment: Deployment,
) -> None:
    env = deployment.env
    # kill -9: the code server sees its run process exit; the supervisor replaces the run.
    killed = deployment.streaming_run("orders")
    os.kill(_run_worker_pid(deployment, killed), signal.SIGKILL)
    execute(env.source_url, "UPDATE public.orders SET note = 'after kill' WHERE id <= 50")
    wait_until(lambda: killed not in deployment.active_runs("orders"), 180,
               "the killed run to end")
    replacement = deployment.streaming_run("orders")
    assert replacement != killed
    wait_until(lambda: env.converged("public.orders"), 120, "the replacement run")

    # A process that stops without anyone noticing (host lost, frozen): Dagster keeps the run
    # STARTED; only the stale heartbeat gives it away. SIGSTOP makes exactly that.
    hung_pid = _run_worker_pid(deployment, replacement)
    os.kill(hung_pid, signal.SIGSTOP)
    try:
        wait_until(lambda: replacement not in deployment.active_runs("orders"), 180,
                   "the supervisor to fail the silent run")
    finally:
        os.kill(hung_pid, signal.SIGKILL)  # now gone for good, as a lost host would be
    statuses = {run_id: status for run_id, status, _, _ in deployment.runs("orders")}
    assert statuses[replacement] == "FAILURE"
    assert f"Streaming run {replacement} of pipeline orders stopped heartbeating" in (
        deployment.output())
    execute(env.source_url, "INSERT INTO public.orders VALUES (2000, 2, 'after hang')")
    third = deployment.streaming_run("orders")
    assert third not in (killed, replacement)
    wait_until(lambda: env.converged("public.orders"), 120, "the run after the hang")


def test_a_dropped_slot_deletes_the_stale_offset_and_the_resnapshot_converges(
    deployment: Deployment,
) -> None:
    env = deployment.env
    deployment.rosetta("pipeline", "pause", "orders")
    wait_until(lambda: deployment.active_runs("orders") == [], 180, "the paused run to stop")
    offsets = deployment.workdir / "tmp" / "offsets" / "orders.dat"
    assert offsets.exists()
    wait_until(lambda: fetch(env.source_url, SLOT_ACTIVE) == [(False,)], 60, "the slot's release")
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_orders')",
            "DELETE FROM public.orders WHERE id BETWEEN 100 AND 150",
            "UPDATE public.orders SET note = 'while dropped' WHERE id < 10",
            "INSERT INTO public.orders VALUES (3000, 3, 'while dropped')")
    # The guard deletes the file, logs, then records the cleanup: wait for the record, the last.
    history_query = "SELECT offset_file, slot_name FROM offset_cleanups"
    wait_until(lambda: fetch(deployment.config_url, history_query) != [], 180,
               "the slot guard to delete the stale offset and record it")
    assert fetch(deployment.config_url, history_query) == [
        ("tmp/offsets/orders.dat", "rosetta_orders")]
    assert not offsets.exists()
    output = deployment.output()
    assert "Deleting stale offset file: tmp/offsets/orders.dat" in output
    assert "Deleted stale offset. Debezium will start fresh with snapshot mode." in output

    deployment.rosetta("pipeline", "start", "orders")
    deployment.streaming_run("orders")
    wait_until(lambda: env.converged("public.orders"), 120, "the re-snapshot, deletions included")


def test_an_unreachable_source_is_marked_error_and_backs_off_while_others_stream(
    deployment: Deployment,
) -> None:
    env = deployment.env
    execute(env.source_url, "INSERT INTO public.orders VALUES (4000, 4, 'still streaming')")
    wait_until(lambda: env.converged("public.orders"), 180, "orders to keep streaming")
    state = fetch(deployment.config_url, "SELECT m.state, m.last_error FROM pipeline_metadata m "
                  "JOIN pipelines p ON p.id = m.pipeline_id WHERE p.name = 'broken'")
    assert state[0][0] == "ERROR"
    assert "could not connect to source unreachable" in str(state[0][1])
    runs = [r for r in deployment.runs("broken") if r[1] not in ACTIVE]
    assert len(runs) >= 3, runs
    assert all(status == "FAILURE" for _, status, _, _ in runs)
    # Each relaunch waited at least its backoff after the previous failure ended.
    for attempt, (previous, following) in enumerate(zip(runs, runs[1:], strict=False), start=1):
        backoff = min(OPERATIONS["restart_backoff_initial_seconds"] * 2 ** (attempt - 1),
                      OPERATIONS["restart_backoff_max_seconds"])
        assert previous[3] is not None
        assert following[2] - previous[3] >= backoff - 0.5, (attempt, runs)


def test_the_wal_monitor_stores_and_logs_readings_of_each_slot(deployment: Deployment) -> None:
    deployment.rosetta("pipeline", "start", "orders")  # already streaming after the tests above
    deployment.streaming_run("orders")

    def orders_reading() -> bool:
        rows = fetch(deployment.config_url,
                     "SELECT status, active, wal_status, retained_wal_bytes FROM wal_monitor "
                     "WHERE slot_name = 'rosetta_orders' ORDER BY id DESC LIMIT 1")
        return bool(rows) and rows[0][0] == "OK" and rows[0][2] == "reserved"

    wait_until(orders_reading, 180, "a WAL monitor reading of the active slot")
    assert "slot rosetta_orders on source src: wal_size=" in deployment.output()
    events = dict(fetch(  # type: ignore[arg-type]
        deployment.storage_url,
        "SELECT dagster_event_type, count(*) FROM event_logs WHERE asset_key = %s "
        "GROUP BY dagster_event_type", ('["replication_slot", "orders"]',)))
    assert events.get("ASSET_OBSERVATION", 0) >= 1, (events, fetch(
        deployment.storage_url, "SELECT DISTINCT asset_key, dagster_event_type FROM event_logs "
        "WHERE asset_key IS NOT NULL"))
    checks = fetch(deployment.storage_url,
                   "SELECT asset_key, check_name, execution_status FROM asset_check_executions")
    assert ('["replication_slot", "orders"]', "retained_wal", "SUCCEEDED") in checks, checks


def test_a_pgoutput_pipeline_streams_through_the_same_job_and_stops_at_once(
    deployment: Deployment,
) -> None:
    env = deployment.env
    deployment.rosetta("pipeline", "start", "ledger")
    run = deployment.streaming_run("ledger")
    wait_until(lambda: env.converged("public.ledger"), 180, "the initial load of ledger")
    execute(env.source_url,
            "UPDATE public.ledger SET booked = '4713-01-01 00:00:00+00 BC', "
            "tags = '[0:1]={x,y}' WHERE id <= 10", "DELETE FROM public.ledger WHERE id > 90")
    wait_until(lambda: env.converged("public.ledger"), 180, "ledger's streamed changes")
    # The op's log names the engine (the event log is written as the run goes).
    wait_until(lambda: fetch(deployment.storage_url, "SELECT count(*) FROM event_logs WHERE "
                             "run_id = %s AND event LIKE %s",
                             (run, "%Streaming pipeline ledger with the pgoutput engine%"))
               == [(1,)], 90, "the op's line naming the engine")
    # Nothing on the host: the position is in the destination.
    assert not (deployment.workdir / "tmp" / "offsets" / "ledger.dat").exists()
    assert fetch(env.destination_url, "SELECT count(*) FROM replica._rosetta_positions "
                 "WHERE pipeline = 'ledger'") == [(1,)]

    deployment.rosetta("pipeline", "pause", "ledger")
    asked = time.monotonic()
    deployment.client.terminate_run(run)
    wait_until(lambda: deployment.active_runs("ledger") == [], 90, "the terminated run to end")
    print(f"pgoutput run terminated in {time.monotonic() - asked:.1f} s")
    assert time.monotonic() - asked < 10
    assert deployment.runs("ledger")[-1][1] == "CANCELED"
    # The run closed its replication connection; the walsender lets go of the slot as it exits.
    wait_until(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots "
                             "WHERE slot_name = 'rosetta_ledger'") == [(False,)],
               10, "the slot to be released")


def test_eight_pipelines_on_one_instance_get_one_run_each_converge_and_pools_stay_calm(
    deployment: Deployment,
) -> None:
    env = deployment.env
    stop = threading.Event()

    def write() -> None:  # a concurrent writer to all eight tables until told to stop
        n = 1000
        while not stop.is_set():
            n += 1
            execute(env.source_url, *(
                f"INSERT INTO public.{name} VALUES ({n}, 'w', now()); "  # noqa: S608
                f"UPDATE public.{name} SET v = v || '+', at = now() WHERE id = {n % 100 + 1}"
                for name in FLEET))
            time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        execute(deployment.config_url,
                "UPDATE pipelines SET status = 'START' WHERE name LIKE 'fleet%'")
        runs = {name: deployment.streaming_run(name) for name in FLEET}
        for name in FLEET:  # every stream applies while the writer goes on
            wait_until(lambda name=name: fetch(
                env.destination_url, f"SELECT count(*) FROM replica.{name} WHERE id > 1000"  # noqa: S608
            )[0][0] > 0, 120, f"{name} to apply the writer's rows")
    finally:
        stop.set()
        writer.join(30)
    for name in FLEET:
        wait_until(lambda name=name: env.converged(f"public.{name}"), 120, f"{name} to converge")
        assert [r[0] for r in deployment.runs(name)] == [runs[name]]  # exactly one run each

    # Each pool judged on its own: eight streams' pools (and the daemon's) are far from full,
    # however many sessions config_db has in total.
    with ResilientConnectionPool(deployment.config_url,
                                 PoolSettings.from_env(max_conn=1)) as pool:
        outcomes = {o.name: o for o in evaluate_config_store(ConfigStore(pool),
                                                             OperationsSettings())}
    utilisation = outcomes["pool_utilisation"]
    assert utilisation.passed, utilisation
    assert int(utilisation.metadata["pools"]) >= 2 * len(FLEET)  # config_db + destination each
    assert outcomes["server_connections"].passed, outcomes["server_connections"]
    sessions = fetch(deployment.config_url, "SELECT count(*) FROM pg_stat_activity "
                     "WHERE datname = current_database()")[0][0]
    print(f"config_db sessions with the {len(FLEET)} streams running: {sessions}; "
          f"{utilisation.description}")

    execute(deployment.config_url, "UPDATE pipelines SET status = 'PAUSE' WHERE name LIKE 'fleet%'")
    for name in FLEET:
        wait_until(lambda name=name: deployment.active_runs(name) == [], 180, f"{name} to stop")


def test_each_process_opens_its_config_store_pool_once(deployment: Deployment) -> None:
    """After minutes of sensor ticks (the supervisor every 5 s, the WAL monitor every 10 s, the
    backfill, slot-guard and notification sensors) and dozens of runs: the code server opens
    its config_db pool once, each run its own two (config_db and its destination), so the
    checklist's start-up line is not drowned in noise (it was once per tick)."""
    output = deployment.output()
    # Each line names its process: a run opens two pools (config_db and its destination), the
    # code server and every other process one.
    opened: dict[str, int] = {}
    for pid in re.findall(r"\[(\d+)\] rosetta\.pool: Connection pool initialized successfully on "
                          r"attempt", output):
        opened[pid] = opened.get(pid, 0) + 1
    runs = int(fetch(deployment.storage_url, "SELECT count(*) FROM runs")[0][0])  # type: ignore[call-overload]
    ticks = int(fetch(deployment.storage_url, "SELECT count(*) FROM job_ticks")[0][0])  # type: ignore[call-overload]
    print(f"{sum(opened.values())} pools opened by {len(opened)} processes for {runs} runs and "
          f"{ticks} sensor and schedule ticks")
    assert ticks > 3 * runs  # a pool per tick would exceed the bound below on its own
    # A health-check run (the schedule may fire meanwhile) opens one pool per server it checks.
    job_of = {match.group(1): job for job, event in fetch(
        deployment.storage_url, "SELECT r.pipeline_name, e.event FROM event_logs e JOIN runs r "
        "ON r.run_id = e.run_id WHERE e.event LIKE %s", ("%Executing steps in process (pid: %",))
        for match in [re.search(r"Executing steps in process \(pid: (\d+)\)", str(event))]
        if match}
    streams_and_sensors = {pid: count for pid, count in opened.items()
                           if job_of.get(pid) != "replication_health_checks"}
    assert streams_and_sensors and max(streams_and_sensors.values()) <= 2, (opened, job_of)
    # The checklist's target for config_db: fewer than 10 sessions (daemon, code server, webserver
    # and the runs still streaming, once the fleet's runs have ended).
    wait_until(lambda: fetch(deployment.config_url, "SELECT count(*) FROM pg_stat_activity WHERE "
                             "datname = current_database()")[0][0] < 10,  # type: ignore[operator]
               60, "fewer than 10 sessions on config_db")
