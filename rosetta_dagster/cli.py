"""rosetta: PostgreSQL change-data-capture pipelines on Dagster (see docs/manual.md for every command)."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress

import psutil

from rosetta_dagster.core.backfill.request import KEYLESS_NOTE, check_backfill_request
from rosetta_dagster.core.config_store import BackfillStatus, ConfigStore, Pipeline, PipelineState
from rosetta_dagster.core.destination.errors import RefusedChange
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.filters import OPERATORS, FilterError, parse_filter
from rosetta_dagster.core.notify import Notifier
from rosetta_dagster.core.pipeline_config import TableRef, load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.replication import application_name
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.streaming.termination import exit_now, termination_event
from rosetta_dagster.local_stack import LocalStack, dagster_dev_command, dagster_graphql
from rosetta_dagster.settings import (
    CONFIG_DATABASE_URL_ENV,
    PROJECT_ROOT,
    config_database_url,
    local_state_dir,
    offsets_dir,
)

logger = logging.getLogger("rosetta.cli")


@contextmanager
def _open_config_store(url: str | None, setting: str = CONFIG_DATABASE_URL_ENV) -> Iterator[ConfigStore]:
    """A small pool to config_db for one command, closed when the command ends."""
    with ResilientConnectionPool(
        url, PoolSettings.from_env(max_conn=2, application_name=application_name("cli")),
        label="config_db", setting=setting
    ) as pool:
        yield ConfigStore(pool)


def _config_store(args: argparse.Namespace) -> AbstractContextManager[ConfigStore]:
    if args.database_url:
        return _open_config_store(args.database_url, "--database-url")
    return _open_config_store(config_database_url())


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        applied = store.upgrade()
        print(
            f"config_db at schema version {store.schema_version()} "
            f"({len(applied)} migration(s) applied now)."
        )
    return 0


def _cmd_db_status(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        print(f"config_db at {store.pool.target.description}: schema version "
              f"{store.schema_version()}")
    return 0


def _cmd_local_up(args: argparse.Namespace) -> int:
    stack = LocalStack(local_state_dir())
    cluster = stack.up()
    print(f"Local PostgreSQL {cluster.binaries.version} ({cluster.binaries.origin}) running on "
          f"127.0.0.1:{cluster.port}")
    print(f"Connection settings: source {stack.root / 'env.sh'}")
    return 0


def _cmd_local_down(args: argparse.Namespace) -> int:
    LocalStack(local_state_dir()).down()
    print("Local PostgreSQL stopped.")
    return 0


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _free_or_any(port: int) -> int:
    """``port`` if nothing listens there, else any free loopback port."""
    if _port_is_free(port):
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reset_signals() -> None:
    # A shell's background job inherits SIGINT ignored; dg dev must obey Ctrl-C/SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


_ACTIVE_STREAM_RUNS = """
query ($pipeline: String!) {
  runsOrError(filter: {tags: [{key: "rosetta/pipeline", value: $pipeline}],
                       statuses: [QUEUED, NOT_STARTED, STARTING, STARTED]}) {
    ... on Runs { results { runId } } } }
"""


def _terminate_streams(url: str, pipeline: str) -> None:
    """Stop the pipeline's runs through Dagster so the engine flushes offsets and frees the slot."""
    from dagster_graphql import DagsterGraphQLClient

    host, port = url.removeprefix("http://").split(":")
    client = DagsterGraphQLClient(host, port_number=int(port))
    try:
        runs = dagster_graphql(url, _ACTIVE_STREAM_RUNS, {"pipeline": pipeline}
                               )["runsOrError"]["results"]
        for run in runs:
            client.terminate_run(run["runId"])
        stop_by = time.monotonic() + 20
        for run in runs:
            while time.monotonic() < stop_by and client.get_run_status(run["runId"]).value not in (
                "CANCELED", "FAILURE", "SUCCESS"
            ):
                time.sleep(0.5)
    except Exception:  # noqa: BLE001 - nothing running, or the webserver is already gone
        pass


def _cmd_dev(args: argparse.Namespace) -> int:
    stack = LocalStack(local_state_dir())
    cluster = stack.up()
    environment = stack.environment(cluster)
    demo = "demo"
    with _open_config_store(environment[CONFIG_DATABASE_URL_ENV]) as store:
        store.upgrade()
        version = store.schema_version()
        for declared in load_config(stack.pipeline_file, resolve_secrets=False).pipelines.values():
            store.sync_pipeline(declared)
        # The supervisor sensor launches the stream once Dagster is up.
        store.set_pipeline_status(demo, "PAUSE" if args.no_stream else "START")
    port = _free_or_any(args.port)
    api_port = _free_or_any(args.api_port)
    url = f"http://127.0.0.1:{port}"
    print(f"Config store migrated (schema version {version}) on 127.0.0.1:{cluster.port}.")
    print(f"Dagster UI: {url}  (Ctrl-C stops Dagster and the local PostgreSQL)", flush=True)
    print(f"REST API: http://127.0.0.1:{api_port}/api/v1/pipelines  (OpenAPI: /docs)", flush=True)
    example = "INSERT INTO test_table VALUES (1001, 'test data', now())"  # noqa: S608 (shown to users)
    print(f"Try it: source {stack.root / 'env.sh'} && psql \"$DEMO_SOURCE_URL\" -c \"{example}\"",
          flush=True)
    command = dagster_dev_command(PROJECT_ROOT / "workspace.yaml", port)
    # Own sessions: a terminal's Ctrl-C reaches only this process, which pauses the pipeline
    # and stops its run through Dagster (cleanly, CANCELED) before stopping the rest; sent to
    # the whole process group it would interrupt the run mid-batch.
    child = subprocess.Popen(
        command, env={**os.environ, **environment}, cwd=PROJECT_ROOT, preexec_fn=_reset_signals,
        start_new_session=True,
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "rosetta_dagster.cli", "api", "--port", str(api_port)],
        env={**os.environ, **environment}, cwd=PROJECT_ROOT, preexec_fn=_reset_signals,
        start_new_session=True,
    )

    # dg dev's code servers run in sessions of their own, and one waits for the runs it launched
    # (say a scheduled health check that started just now): collected while dg dev runs, so
    # that none outlives it (it would retry the stopped PostgreSQL for minutes).
    descendants: list[psutil.Process] = []

    def forward(signum: int, _frame: object) -> None:
        # Pause first so the supervisor does not relaunch what is being stopped.
        with _open_config_store(environment[CONFIG_DATABASE_URL_ENV]) as store:
            store.set_pipeline_status(demo, "PAUSE")
        _terminate_streams(url, demo)
        with suppress(psutil.NoSuchProcess):
            descendants.extend(psutil.Process(child.pid).children(recursive=True))
        child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        if not args.no_stream:
            print(f"The pipeline supervisor starts stream_{demo}: {url}/runs", flush=True)
        return child.wait()
    finally:
        api.terminate()
        api.wait(10)
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for process in alive:
            with suppress(psutil.NoSuchProcess):
                process.kill()
        if not args.keep_postgres:
            stack.down()


def _cmd_stream(args: argparse.Namespace) -> int:
    """Stream one pipeline in the foreground (what the Dagster op does, without Dagster).
    SIGTERM or Ctrl-C close the engine and end it with exit code 0."""
    pipeline = load_config().pipeline(args.pipeline)
    interrupted = False
    with termination_event() as terminating:
        try:
            with _config_store(args) as store:
                store.upgrade()
                store.sync_pipeline(pipeline)
                session = StreamingSession(pipeline, offsets_dir=offsets_dir(),
                                           config_store=store)
                if not terminating.is_set():
                    session.run(tick=lambda p: logger.info("Pipeline %s: %d events applied",
                                                           pipeline.name, p.events_applied),
                                stop_when=lambda _: terminating.is_set())
        except KeyboardInterrupt:  # lands in the waiting thread, which closed the engine
            interrupted = True
    if interrupted or terminating.is_set():
        print(f"Pipeline {pipeline.name} stopped.")
        exit_now(0)  # everything is closed (see exit_now: a signal can spoil the teardown)
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        store.upgrade()  # like every other starter of the config store
        if args.pipeline_command == "sync":
            # Names only: syncing needs no secrets.
            for declared in load_config(resolve_secrets=False).pipelines.values():
                store.sync_pipeline(declared)
        elif args.pipeline_command in ("start", "pause"):
            pipeline = store.set_pipeline_status(args.name, args.pipeline_command.upper())
            print(f"Pipeline {pipeline.name}: status {pipeline.status.value}")
            return 0
        elif args.pipeline_command == "skip":
            return _skip(store, args)
        elif args.pipeline_command == "status":
            pipeline = store.get_pipeline(args.name)
            for label, value in (
                ("pipeline", pipeline.name), ("status", pipeline.status.value),
                ("state", pipeline.state.value), ("run", pipeline.run_id or "-"),
                ("heartbeat", pipeline.heartbeat_at or "-"),
                ("last start", pipeline.last_start_at or "-"),
                ("last error", pipeline.last_error or "-"),
                ("stopped on", _refused_line(pipeline.last_apply_error)),
                ("parked", sum(n for p, _, _, n in store.parked_counts() if p == pipeline.name)),
                ("lag", _lag_line(pipeline)),
                ("tables", ", ".join(pipeline.tables)),
                ("destinations", ", ".join(pipeline.destinations)),
            ):
                print(f"{label + ':':14}{value}")
            return 0 if pipeline.state is not PipelineState.ERROR else 1
        for pipeline in store.list_pipelines():
            print(f"{pipeline.name}\t{pipeline.status.value}\t{pipeline.state.value}\t"
                  f"{pipeline.last_error or ''}")
    return 0


def _refused_line(report: RefusedChange | None) -> str:
    if report is None:
        return "-"
    key = ", ".join(f"{k}={v}" for k, v in report.key.items())
    return (f"{report.operation} of {report.table} ({key}) at {report.position} on "
            f"{report.destination}")


def _lag_line(pipeline: Pipeline) -> str:
    lag = pipeline.lag
    if lag is None or pipeline.lag_measured_at is None:
        return "not measured yet"
    when = f"measured {pipeline.lag_measured_at:%Y-%m-%d %H:%M:%S %Z}"
    if lag.seconds is None:
        return f"{lag.note} ({when})"
    return f"{lag.seconds:.1f} s, {lag.bytes} bytes of WAL ({when})"


def _skip(store: ConfigStore, args: argparse.Namespace) -> int:
    """Skip exactly the change the pipeline stopped on, after the user confirmed it."""
    pipeline = store.get_pipeline(args.name)
    report = pipeline.last_apply_error
    if report is None:
        print(f"rosetta: pipeline {args.name} did not stop on a refused change; nothing to skip.",
              file=sys.stderr)
        return 2
    if report.position != args.position:
        print(f"rosetta: pipeline {args.name} stopped on the change at {report.position}, "
              f"not {args.position}; nothing skipped.", file=sys.stderr)
        return 2
    print(f"Pipeline {args.name} stopped on: {_refused_line(report)}")
    print(f"  {report.message}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("rosetta: confirm with --yes (no terminal to ask on); nothing skipped.",
                  file=sys.stderr)
            return 2
        answer = input("Skip this change on that destination? It will never be applied. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing skipped.")
            return 1
    who = args.by or os.environ.get("USER") or getpass.getuser()
    skip_id = store.request_skip(args.name, report, who)
    print(f"Skip {skip_id} recorded for pipeline {args.name} by {who}: the change is dropped "
          f"when the pipeline streams again (rosetta pipeline start {args.name}).")
    return 0


def _cmd_parked(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        store.upgrade()
        key = json.loads(args.key) if getattr(args, "key", None) else None
        if key is not None and not isinstance(key, dict):
            raise RosettaError('--key must be a JSON object such as {"id": "7"}.')
        if args.parked_command == "list":
            for row in store.list_parked(args.pipeline, args.table):
                print(f"{row.id}\t{row.pipeline}\t{row.destination}\t{row.table_name}\t"
                      f"{json.dumps(row.key)}\t{row.operation}\t{row.position or '-'}\t"
                      f"{row.attempts}\t{row.error}")
            return 0
        if args.parked_command == "retry":
            count = store.request_parked_retry(args.pipeline, args.table, key)
            print(f"{count} parked change(s) of pipeline {args.pipeline} will be replayed in order "
                  "by its stream; their keys stream again once they went through.")
            return 0
        count = store.discard_parked(args.pipeline, args.table, key)
        print(f"Discarded {count} parked change(s) of pipeline {args.pipeline}.")
    return 0


def _cmd_notifications(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        store.upgrade()
        if args.notifications_command == "list":
            for row in reversed(store.list_notifications(args.limit, args.pipeline)):
                outcome = "delivered" if row.delivered else f"failed ({row.error})"
                print(f"{row.created_at:%Y-%m-%d %H:%M:%S}\t{row.channel}\t"
                      f"{row.transition}\tattempt {row.attempt}\t{outcome}\t{row.text}")
            return 0
        settings = load_config().notifications
        if not settings.channels:
            raise RosettaError("rosetta.yaml declares no notification channels "
                               "(notifications.channels).")
        unknown = sorted(set(args.channel) - {c.name for c in settings.channels})
        if unknown:
            raise RosettaError(f"rosetta.yaml has no notification channel named '{unknown[0]}'.")
        failed = 0
        for delivery in Notifier(settings, store).send_test(args.channel):
            failed += not delivery.delivered
            print(f"{delivery.channel}: " + ("delivered" if delivery.delivered else
                  f"failed after {delivery.attempts} attempt(s): {delivery.error}"))
        return 1 if failed else 0


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _cmd_api(args: argparse.Namespace) -> int:
    """Serve the REST API with uvicorn; loopback only unless a token protects it."""
    import uvicorn

    from rosetta_dagster.api.app import API_TOKEN_ENV, create_app

    token = os.environ.get(API_TOKEN_ENV) or None
    if args.host not in _LOOPBACK and token is None:
        print(f"rosetta: refusing to serve the API on {args.host} without {API_TOKEN_ENV}; "
              "set a token or bind to 127.0.0.1.", file=sys.stderr)
        return 2
    url = args.database_url or config_database_url()
    if not url:
        print(f"rosetta: set {CONFIG_DATABASE_URL_ENV} (or --database-url) to the config store.",
              file=sys.stderr)
        return 2
    uvicorn.run(create_app(url, token=token), host=args.host, port=args.port, log_level="info")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rosetta", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    db = commands.add_parser("db", help="Config store schema.").add_subparsers(
        dest="db_command", required=True
    )
    for name, func, text in (
        ("upgrade", _cmd_db_upgrade, "Apply pending config store migrations."),
        ("status", _cmd_db_status, "Show the config store schema version."),
    ):
        sub = db.add_parser(name, help=text)
        sub.add_argument("--database-url", help=f"Defaults to ${CONFIG_DATABASE_URL_ENV}.")
        sub.set_defaults(func=func)

    local = commands.add_parser("local", help="Local PostgreSQL for the demo.").add_subparsers(
        dest="local_command", required=True
    )
    local.add_parser("up", help="Start the local PostgreSQL cluster.").set_defaults(
        func=_cmd_local_up
    )
    local.add_parser("down", help="Stop the local PostgreSQL cluster.").set_defaults(
        func=_cmd_local_down
    )

    for command_name in ("dev", "demo"):
        dev = commands.add_parser(
            command_name, help="Start local PostgreSQL, migrate, run `dg dev` and the API "
            "(the demo pipeline streams)." + (" Same as `rosetta dev`." if command_name == "demo" else "")
        )
        _dev_arguments(dev)
    return _add_operational_commands(commands, parser)


def _dev_arguments(dev: argparse.ArgumentParser) -> None:
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000).")
    dev.add_argument("--api-port", type=int, default=8000, help="REST API port (default 8000).")
    dev.add_argument("--keep-postgres", action="store_true", help="Leave PostgreSQL running.")
    dev.add_argument("--no-stream", action="store_true",
                     help="Leave the demo pipeline paused (start it with `rosetta pipeline start demo`).")
    dev.set_defaults(func=_cmd_dev)



def _parse_condition(text: str) -> dict[str, object]:
    """'id >= 100' / 'status in a,b' / 'x between 1,5' / 'note is null' -> a filter condition."""
    parts = text.split(None, 1)
    if len(parts) < 2:
        raise FilterError(f"--where '{text}': expected COLUMN OPERATOR [VALUE].")
    column, rest = parts
    for operator in sorted(OPERATORS, key=len, reverse=True):
        if rest.lower() == operator or rest.lower().startswith(operator + " "):
            raw = rest[len(operator):].strip()
            break
    else:
        raise FilterError(f"--where '{text}': unknown operator; use one of {', '.join(OPERATORS)}.")
    value: object = None
    if OPERATORS[operator] in ("list", 2):
        value = [v.strip() for v in raw.split(",")]
    elif OPERATORS[operator] == 1:
        value = raw
    return {"column": column, "operator": operator, "value": value}


def _cmd_backfill(args: argparse.Namespace) -> int:
    with _config_store(args) as store:
        store.upgrade()
        if args.backfill_command == "request":
            pipeline = store.get_pipeline(args.pipeline)
            if args.table not in pipeline.tables:
                raise FilterError(f"Pipeline '{pipeline.name}' has no table '{args.table}' "
                                  f"(it has {', '.join(pipeline.tables)}).")
            raw = [_parse_condition(c) for c in args.where]
            if args.key_range:  # as content_parity prints it: values taken exactly as given
                column, first, last = args.key_range
                raw.append({"column": column, "operator": "between", "value": [first, last]})
            conditions = parse_filter(raw)
            keyless = check_backfill_request(pipeline.name, TableRef.parse(args.table),
                                             conditions)
            job = store.create_backfill_job(pipeline.name, args.table,
                                            [c.as_dict() for c in conditions])
            print(f"Backfill job {job.id}: {job.pipeline} {job.table_name} {job.status.value}"
                  + (f" ({KEYLESS_NOTE})" if keyless else ""))
            return 0
        if args.backfill_command in ("cancel", "retry"):
            change = store.cancel_backfill_job if args.backfill_command == "cancel" else (
                store.retry_backfill_job)
            job = change(args.job_id)
            print(f"Backfill job {job.id}: {job.status.value}")
            return 0
        status = BackfillStatus(args.status.upper()) if args.status else None
        for job in store.list_backfill_jobs(pipeline=args.pipeline, status=status):
            total = "?" if job.total_record is None else job.total_record
            print(f"{job.id}\t{job.pipeline}\t{job.table_name}\t{job.status.value}\t"
                  f"{job.count_record}/{total}\t+{job.rows_inserted} ~{job.rows_updated} "
                  f"-{job.rows_deleted}\t{job.error or ''}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from rosetta_dagster.validation import build_report, format_report

    with _config_store(args) as store:
        store.upgrade()
        report = build_report(store, load_config())
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _add_operational_commands(
    commands: argparse._SubParsersAction, parser: argparse.ArgumentParser  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    database_help = f"Defaults to ${CONFIG_DATABASE_URL_ENV}."
    stream = commands.add_parser("stream", help="Stream one pipeline in the foreground.")
    stream.add_argument("pipeline")
    stream.add_argument("--database-url", help=database_help)
    stream.set_defaults(func=_cmd_stream)

    api = commands.add_parser("api", help="Serve the REST API (OpenAPI at /docs, /openapi.json).")
    api.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    api.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    api.add_argument("--database-url", help=database_help)
    api.set_defaults(func=_cmd_api)

    pipeline = commands.add_parser("pipeline", help="Pipelines in the config store.")
    pipeline.add_argument("--database-url", help=database_help)
    pipeline_commands = pipeline.add_subparsers(dest="pipeline_command", required=True)
    pipeline_commands.add_parser("list", help="List pipelines with status and state.")
    pipeline_commands.add_parser("sync", help="Write rosetta.yaml's pipelines to the store.")
    for verb in ("start", "pause", "status"):
        text = ("Show a pipeline's status, state, heartbeat and last error." if verb == "status"
                else f"Set a pipeline's desired status to {verb.upper()}.")
        pipeline_commands.add_parser(verb, help=text).add_argument("name")
    skip = pipeline_commands.add_parser(
        "skip", help="Drop the change a pipeline stopped on (on_apply_error: stop), once.")
    skip.add_argument("name")
    skip.add_argument("--position", required=True,
                      help="The source position of the change, as `pipeline status` shows it.")
    skip.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
    skip.add_argument("--by", help="Who skips it (default: the OS user), recorded.")
    pipeline.set_defaults(func=_cmd_pipeline)

    parked = commands.add_parser(
        "parked", help="Changes parked because a destination refused them (on_apply_error: park).")
    parked.add_argument("--database-url", help=database_help)
    parked_commands = parked.add_subparsers(dest="parked_command", required=True)
    listing = parked_commands.add_parser("list", help="List parked changes, oldest first.")
    listing.add_argument("--pipeline")
    listing.add_argument("--table")
    for verb, text in (("retry", "Replay parked changes in order and release their keys."),
                       ("discard", "Delete parked changes; their keys stream again.")):
        command = parked_commands.add_parser(verb, help=text)
        command.add_argument("pipeline")
        command.add_argument("--table", help="schema.table (default: every table)")
        command.add_argument("--key", help='One key as JSON, e.g. \'{"id": "7"}\'.')
    parked.set_defaults(func=_cmd_parked)

    notifications = commands.add_parser(
        "notifications", help="Alerts sent to the webhook channels of rosetta.yaml.")
    notifications.add_argument("--database-url", help=database_help)
    notification_commands = notifications.add_subparsers(dest="notifications_command",
                                                         required=True)
    listing = notification_commands.add_parser(
        "list", help="Recent delivery attempts (notification_log), oldest first.")
    listing.add_argument("--pipeline")
    listing.add_argument("--limit", type=int, default=50)
    notification_commands.add_parser(
        "test", help="Send a test notification to every channel (or --channel NAME)."
    ).add_argument("--channel", action="append", default=[])
    notifications.set_defaults(func=_cmd_notifications)

    backfill = commands.add_parser("backfill", help="Backfill jobs (re-copies of source rows).")
    backfill.add_argument("--database-url", help=database_help)
    backfill_commands = backfill.add_subparsers(dest="backfill_command", required=True)
    request = backfill_commands.add_parser(
        "request", help="Queue a backfill job (PENDING) for one table of a pipeline."
    )
    request.add_argument("pipeline")
    request.add_argument("table", help="schema.table, one of the pipeline's tables")
    request.add_argument(
        "--where", action="append", default=[], metavar="COLUMN OPERATOR [VALUE]",
        help="A condition, repeatable (AND): 'id >= 100', 'status in a,b', "
        "'created_at between 2024-01-01,2024-02-01', 'note is null'.",
    )
    request.add_argument(
        "--key-range", nargs=3, metavar=("COLUMN", "FROM", "THROUGH"),
        help="Rows whose COLUMN is between FROM and THROUGH (values as written, commas and "
        "spaces included): the repair the content_parity check prints.",
    )
    listing = backfill_commands.add_parser("list", help="List backfill jobs.")
    listing.add_argument("--pipeline")
    listing.add_argument("--status")
    backfill_commands.add_parser("cancel", help="Cancel a job that has not finished.").add_argument(
        "job_id", type=int
    )
    backfill_commands.add_parser(
        "retry", help="Queue a FAILED or CANCELLED job again (resumes after its last chunk)."
    ).add_argument("job_id", type=int)
    backfill.set_defaults(func=_cmd_backfill)

    validate = commands.add_parser(
        "validate", help="Post-deployment validation from real data; exit 1 on an ERROR check."
    )
    validate.add_argument("--json", action="store_true", help="Machine-readable output.")
    validate.add_argument("--database-url", help=database_help)
    validate.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
    except RosettaError as exc:
        print(f"rosetta: {mask_secrets(str(exc))}", file=sys.stderr)
        code = 2
    return code


def run() -> None:
    """The program's entry point (the ``rosetta`` command, ``python -m``)."""
    code = main()
    if "jpype" in sys.modules:  # a Debezium stream ran (or began) here: no teardown
        exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
