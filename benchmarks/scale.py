"""Scale: many pipelines on one `dg dev` instance, as a deployment would run them.

For each shape (pipelines x tables per pipeline) and engine, on a fresh throwaway cluster:
every pipeline is START before `dg dev` starts; the supervisor launches one run per
pipeline; then a writer changes rows at a fixed total rate spread over every table, while
latency probes (one row at a time, round robin over the pipelines) measure the time from a
source commit to the row being visible in the destination. Reported per shape:

- start -> all streaming: seconds from `dg dev` starting until every pipeline is RUNNING
  (its run started, loaded, and streaming);
- RSS of the stream processes (Dagster run workers), summed, idle (before the writer) and at
  peak, and idle per pipeline next to the goals (Debezium <= 250 MB, pgoutput <= 120 MB);
- CPU of the stream processes during the write phase (cores);
- p50/p99 lag of the probes;
- client sessions per server database (config_db, source, destination, Dagster's storage);
- whether every destination table equals its source afterwards.

    PYTHONPATH=. .venv/bin/python -m benchmarks.scale                 # the default shapes
    PYTHONPATH=. .venv/bin/python -m benchmarks.scale --engine pgoutput --shapes 5x5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from benchmarks.support import aggregate, emit, log, wait_for, write_results_section
from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.core.pipeline_config import load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.harness import execute, fetch
from rosetta_dagster.local_stack import dagster_dev_command, write_dagster_instance_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ("1x5", "5x5", "10x5", "20x5", "1x100")
RSS_GOAL_MB = {"debezium": 250, "pgoutput": 120}
PASSWORD_ENV = "SCALE_PG_PASSWORD"


def _table(pipeline: int, table: int) -> str:
    return f"p{pipeline:02d}_t{table:03d}"


class _Deployment:
    """A cluster with source, destination, config and Dagster databases, and `dg dev`."""

    def __init__(self, root: Path, engine: str, pipelines: int, tables: int,
                 streaming: dict[str, Any] | None = None) -> None:
        self.root, self.engine, self.pipelines, self.tables = root, engine, pipelines, tables
        self.streaming = streaming or {}
        # Room for every pipeline's slot and walsender, plus lag measurements' temporary copies.
        slots = str(pipelines + 10)
        self.cluster = LocalPostgresCluster(root / "pg", password="bench", settings={
            "max_replication_slots": slots, "max_wal_senders": slots, "max_connections": "300"},
        ).start()
        for database in ("src", "dst", "config_db", "dagster"):
            self.cluster.create_database(database)
        self.source, self.destination = self.cluster.dsn("src"), self.cluster.dsn("dst")
        self.config = self.cluster.dsn("config_db")
        self.process: subprocess.Popen[bytes] | None = None

    def names(self) -> list[str]:
        return [f"p{i:02d}" for i in range(self.pipelines)]

    def all_tables(self) -> list[str]:
        return [_table(p, t) for p in range(self.pipelines) for t in range(self.tables)]

    def create_source(self, rows: int) -> None:
        # Generated names: nothing here is input.
        execute(self.source, *(
            f"CREATE TABLE public.{t} (id bigint PRIMARY KEY, v int, at timestamptz); "  # noqa: S608
            f"INSERT INTO public.{t} SELECT g, g, now() FROM generate_series(1, {rows}) g"
            for t in self.all_tables()))

    def write_config(self) -> Path:
        endpoint = {"host": "127.0.0.1", "port": self.cluster.port,
                    "user": self.cluster.superuser, "password": f"${{{PASSWORD_ENV}}}"}
        path = self.root / "rosetta.yaml"
        path.write_text(yaml.safe_dump({
            "sources": {"src": {**endpoint, "database": "src"}},
            "destinations": {"dst": {**endpoint, "database": "dst", "schema": "replica"}},
            "pipelines": {
                name: {"source": "src", "destinations": ["dst"],
                       "tables": [f"public.{_table(p, t)}" for t in range(self.tables)],
                       "streaming": {"engine": self.engine, **self.streaming}}
                for p, name in enumerate(self.names())},
            "operations": {"supervisor_interval_seconds": 5},
        }))
        with ResilientConnectionPool(self.config, PoolSettings(max_conn=1)) as pool:
            store = ConfigStore(pool)
            store.upgrade()
            environ = {PASSWORD_ENV: self.cluster.password}
            for pipeline in load_config(path, environ).pipelines.values():
                store.sync_pipeline(pipeline)
                store.set_pipeline_status(pipeline.name, PipelineStatus.START)
        return path

    def start_dagster(self, config: Path) -> float:
        home = self.root / "home"
        write_dagster_instance_yaml(home, self.cluster, "dagster", PASSWORD_ENV)
        environment = {**os.environ, "DAGSTER_HOME": str(home), "ROSETTA_CONFIG": str(config),
                       "CONFIG_DATABASE_URL": self.config, PASSWORD_ENV: self.cluster.password,
                       "ROSETTA_OFFSETS_DIR": str(self.root / "offsets")}
        started = time.monotonic()
        self.process = subprocess.Popen(
            dagster_dev_command(REPO_ROOT / "workspace.yaml", find_free_port()),
            cwd=self.root, stdout=(self.root / "dagster-dev.log").open("wb"),
            stderr=subprocess.STDOUT, start_new_session=True, env=environment)
        return started

    def running(self) -> int:
        rows = fetch(self.config, "SELECT count(*) FROM pipeline_metadata WHERE state = 'RUNNING'")
        return int(rows[0][0])  # type: ignore[call-overload]

    def stream_processes(self) -> list[psutil.Process]:
        """The processes of the streaming runs: each reports its pools with its pid."""
        rows = fetch(self.config, "SELECT DISTINCT split_part(process, ':', 2)::int FROM "
                     "pool_usage WHERE owner LIKE 'rosetta stream\\_%'")
        found = []
        for (pid,) in rows:
            try:
                found.append(psutil.Process(int(pid)))  # type: ignore[call-overload]
            except psutil.Error:
                continue
        return found

    def sessions(self) -> dict[str, int]:
        rows = fetch(self.cluster.dsn("postgres"),
                     "SELECT datname, count(*) FROM pg_stat_activity WHERE backend_type = "
                     "'client backend' AND datname IS NOT NULL GROUP BY 1")
        walsenders = fetch(self.cluster.dsn("postgres"), "SELECT count(*) FROM pg_stat_activity "
                           "WHERE backend_type = 'walsender'")
        counts = {str(name): int(n) for name, n in rows}  # type: ignore[call-overload]
        counts["walsenders"] = int(walsenders[0][0])  # type: ignore[call-overload]
        counts.pop("postgres", None)  # this very query
        return counts

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Code servers and run workers that outlive `dg dev` (another process group)
            # would otherwise idle on into the next shape's measurement.
            children = psutil.Process(self.process.pid).children(recursive=True)
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            for child in psutil.wait_procs(children, timeout=10)[1]:
                child.kill()
        self.cluster.destroy()


def _rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def _cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def _thread_kind(name: str) -> str:
    """What a stream process's thread does, from its name (Linux truncates to 15 bytes)."""
    if "Compiler" in name:
        return "jit"
    if name.startswith(("G1 ", "GC ", "VM ")) or name in {"Common-Cleaner", "Finalizer"}:
        return "gc_vm"
    if name.startswith("debezium-"):
        return "debezium_reader"  # the connector's replication stream and record conversion
    if name.startswith("pool-"):
        return "engine_handler"  # the engine's task threads: Rosetta's batch handler runs here
    return "python_other"  # Dagster, heartbeats, and every other Python or JVM thread


def _cpu_by_thread_kind(processes: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds of every thread of the stream processes, summed by :func:`_thread_kind`."""
    totals: dict[str, float] = {}
    for process in processes:
        try:
            threads = process.threads()
        except psutil.Error:
            continue
        for thread in threads:
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                continue
            kind = _thread_kind(name)
            totals[kind] = totals.get(kind, 0.0) + thread.user_time + thread.system_time
    return totals


class _Load(threading.Thread):
    """Row changes at ``rate`` per second over every table, and latency probes 5 times a
    second (round robin over the pipelines); probes are inserts with negative keys."""

    def __init__(self, deployment: _Deployment, rate: int) -> None:
        super().__init__(daemon=True)
        self.deployment, self.rate = deployment, rate
        self.stop = threading.Event()
        self.written = threading.Event()
        self.probes: dict[int, tuple[str, float]] = {}  # key -> (table, committed at)
        self.seen: dict[int, float] = {}
        self.changes = 0

    def run(self) -> None:
        import psycopg2

        watcher = threading.Thread(target=self._watch, daemon=True)
        watcher.start()
        tables = self.deployment.all_tables()
        source = psycopg2.connect(self.deployment.source)
        source.autocommit = True
        tick, probe, next_key = 0.1, 0, 10_000_000
        next_probe = time.monotonic()
        with source.cursor() as write:
            while not self.stop.is_set():
                started = time.monotonic()
                for _ in range(max(1, int(self.rate * tick))):
                    table = random.choice(tables)  # noqa: S311 - a workload, not a secret
                    next_key += 1
                    write.execute(f"INSERT INTO public.{table} VALUES (%s, 1, now())",  # noqa: S608
                                  (next_key,))
                    self.changes += 1
                if time.monotonic() >= next_probe:
                    probe += 1
                    table = _table(probe % self.deployment.pipelines, 0)
                    write.execute(f"INSERT INTO public.{table} VALUES (%s, 0, now())",  # noqa: S608
                                  (-probe,))
                    self.probes[-probe] = (table, time.monotonic())
                    next_probe += 0.2
                time.sleep(max(0.0, tick - (time.monotonic() - started)))
        source.close()
        self.written.set()
        watcher.join(90)

    def _watch(self) -> None:
        """Polls the destination every 5 ms for the probes not seen yet."""
        import psycopg2

        destination = psycopg2.connect(self.deployment.destination)
        destination.autocommit = True
        deadline: float | None = None
        with destination.cursor() as cursor:
            while True:
                waiting: dict[str, list[int]] = {}
                for key, (table, _) in list(self.probes.items()):
                    if key not in self.seen:
                        waiting.setdefault(table, []).append(key)
                if self.written.is_set():
                    deadline = deadline or time.monotonic() + 60
                    if not waiting or time.monotonic() > deadline:
                        break
                for table, keys in waiting.items():
                    cursor.execute(f"SELECT id FROM replica.{table} WHERE id = ANY(%s)",  # noqa: S608
                                   (keys,))
                    now = time.monotonic()
                    for (key,) in cursor.fetchall():
                        self.seen[key] = now
                time.sleep(0.005)
        destination.close()

    def lags_ms(self, half: int | None = None) -> list[float]:
        """The probes' lags, sorted; ``half`` 0 or 1: only the first or second half of the
        write phase's probes (lag that grows over the run shows as a worse second half)."""
        probes = sorted(self.probes.items(), key=lambda item: item[1][1])
        if half is not None:
            middle = len(probes) // 2
            probes = probes[:middle] if half == 0 else probes[middle:]
        return sorted((self.seen[k] - at) * 1000 for k, (_, at) in probes if k in self.seen)


def _percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))] if values else float("nan")


def measure(engine: str, pipelines: int, tables: int, rate: int, seconds: int,
            streaming: dict[str, Any] | None = None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="rosetta-scale-"))
    root.chmod(0o755)  # the server runs as its own OS user under root
    deployment = _Deployment(root, engine, pipelines, tables, streaming)
    try:
        deployment.create_source(rows=1000)
        config = deployment.write_config()
        started = deployment.start_dagster(config)
        deadline = started + 1800
        while deployment.running() < pipelines:
            if time.monotonic() > deadline or deployment.process.poll() is not None:  # type: ignore[union-attr]
                raise RuntimeError(f"only {deployment.running()} of {pipelines} pipelines "
                                   f"streaming; see {root / 'dagster-dev.log'}")
            time.sleep(0.5)
        start_s = time.monotonic() - started
        log(f"{engine} {pipelines}x{tables}: all streaming after {start_s:.0f} s")
        time.sleep(10)  # settle: first observations, lag measurements
        processes = deployment.stream_processes()
        idle_rss = _rss_mb(processes)
        load = _Load(deployment, rate)
        cpu_before, wall_before = _cpu_s(processes), time.monotonic()
        kinds_before = _cpu_by_thread_kind(processes)
        load.start()
        peak_rss = idle_rss
        phase_end = time.monotonic() + seconds
        while time.monotonic() < phase_end:
            time.sleep(2)
            peak_rss = max(peak_rss, _rss_mb(processes))
        sessions = deployment.sessions()
        wall = time.monotonic() - wall_before
        cores = (_cpu_s(processes) - cpu_before) / wall
        cores_by_kind = {kind: (spent - kinds_before.get(kind, 0.0)) / wall
                         for kind, spent in _cpu_by_thread_kind(processes).items()}
        load.stop.set()
        load.join(120)
        lags = load.lags_ms()
        exact = True
        for table in deployment.all_tables():
            try:
                wait_for(lambda t=table: aggregate(deployment.source, f"public.{t}", "v")
                         == aggregate(deployment.destination, f"replica.{t}", "v"), 120, 0.2)
            except TimeoutError:
                exact = False
        return {
            "engine": engine, "pipelines": pipelines, "tables_per_pipeline": tables,
            "runs": len(processes), "rate_per_s": rate, "changes": load.changes,
            "start_to_all_streaming_s": start_s, "idle_rss_mb": idle_rss,
            "idle_rss_mb_per_pipeline": idle_rss / pipelines, "peak_rss_mb": peak_rss,
            "rss_goal_mb_per_pipeline": RSS_GOAL_MB[engine], "stream_cpu_cores": cores,
            "stream_cpu_cores_by_thread": cores_by_kind,
            "probes": len(load.probes), "probes_seen": len(lags),
            "lag_p50_ms": _percentile(lags, 0.5), "lag_p99_ms": _percentile(lags, 0.99),
            "lag_p99_halves_ms": [_percentile(load.lags_ms(half), 0.99) for half in (0, 1)],
            "sessions": sessions, "exact": exact,
        }
    finally:
        deployment.close()


def _halves(result: dict[str, Any]) -> str:
    first, second = result.get("lag_p99_halves_ms", [float("nan")] * 2)
    return f"p99 {first:.0f} then {second:.0f}"


def _kinds(result: dict[str, Any]) -> str:
    by_kind = result.get("stream_cpu_cores_by_thread", {})
    return " / ".join(f"{by_kind.get(kind, 0.0):.2f}" for kind in (
        "jit", "gc_vm", "debezium_reader", "engine_handler", "python_other"))


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| engine | pipelines x tables | start -> all streaming | stream RSS idle (per "
             "pipeline; goal) | peak RSS | stream CPU (JIT / GC+VM / Debezium reader / engine "
             "handler / other) | lag p50 / p99 (p99 of the first and second half) | sessions: config_db / "
             "source / destination / Dagster + walsenders | exact |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in results:
        per = r["idle_rss_mb_per_pipeline"]
        goal = r["rss_goal_mb_per_pipeline"]
        s = r["sessions"]
        lines.append(
            f"| {r['engine']} | {r['pipelines']} x {r['tables_per_pipeline']} | "
            f"{r['start_to_all_streaming_s']:.0f} s | {r['idle_rss_mb']:,.0f} MB ({per:.0f} MB; "
            f"<= {goal}: {'met' if per <= goal else '**not met**'}) | "
            f"{r['peak_rss_mb']:,.0f} MB | {r['stream_cpu_cores']:.2f} cores ({_kinds(r)}) | "
            f"{r['lag_p50_ms']:.0f} / {r['lag_p99_ms']:.0f} ms ({_halves(r)}) | "
            f"{s.get('config_db', 0)} / "
            f"{s.get('src', 0)} / {s.get('dst', 0)} / {s.get('dagster', 0)} + "
            f"{s.get('walsenders', 0)} | {'yes' if r['exact'] else '**no**'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["debezium", "pgoutput", "both"], default="both")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help="pipelines x tables per pipeline, comma separated")
    parser.add_argument("--rate", type=int, default=500, help="row changes per second in total")
    parser.add_argument("--seconds", type=int, default=30, help="length of the write phase")
    parser.add_argument("--streaming", type=json.loads, default={},
                        help='more streaming settings for every pipeline, as JSON '
                             '(e.g. \'{"poll_interval_ms": 50}\')')
    args = parser.parse_args()
    engines = ("pgoutput", "debezium") if args.engine == "both" else (args.engine,)
    results = []
    for engine in engines:
        for shape in args.shapes.split(","):
            pipelines, tables = (int(n) for n in shape.split("x"))
            result = measure(engine, pipelines, tables, args.rate, args.seconds,
                             args.streaming)
            emit(result)
            results.append(result)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_results_section("scale", (
        f"## Scale (`python -m benchmarks.scale`)\n\nMeasured {stamp}: `dg dev` with every "
        f"pipeline START, {args.rate} row changes/s in total over every table for "
        f"{args.seconds} s, 5 latency probes/s"
        + (f", streaming settings {json.dumps(args.streaming)}" if args.streaming else "")
        + f".\n\n{table(results)}\n"))
    print(table(results))


if __name__ == "__main__":
    main()
