"""The ``rosetta`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.local_stack import CONFIG_DB, LocalStack
from rosetta_dagster.settings import (
    CONFIG_DATABASE_URL_ENV,
    PROJECT_ROOT,
    config_database_url,
    local_state_dir,
)

logger = logging.getLogger("rosetta.cli")


def _config_store(args: argparse.Namespace) -> ConfigStore:
    pool = ResilientConnectionPool(
        args.database_url or config_database_url(),
        PoolSettings.from_env(max_conn=2),
        label="config_db",
        setting="--database-url" if args.database_url else CONFIG_DATABASE_URL_ENV,
    ).open()
    return ConfigStore(pool)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    store = _config_store(args)
    try:
        applied = store.upgrade()
        print(
            f"config_db at schema version {store.schema_version()} "
            f"({len(applied)} migration(s) applied now)."
        )
    finally:
        store.pool.close()
    return 0


def _cmd_db_status(args: argparse.Namespace) -> int:
    store = _config_store(args)
    try:
        print(f"config_db at {store.pool.target.description}: schema version "
              f"{store.schema_version()}")
    finally:
        store.pool.close()
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


def _reset_signals() -> None:
    # A shell's background job inherits SIGINT ignored; dagster dev must obey Ctrl-C/SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _cmd_dev(args: argparse.Namespace) -> int:
    stack = LocalStack(local_state_dir())
    cluster = stack.up()
    config_url = cluster.dsn(CONFIG_DB)
    store = ConfigStore(
        ResilientConnectionPool(config_url, PoolSettings.from_env(max_conn=2)).open()
    )
    try:
        store.upgrade()
        version = store.schema_version()
    finally:
        store.pool.close()
    port = args.port
    if not _port_is_free(port):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    env = {
        **os.environ,
        CONFIG_DATABASE_URL_ENV: config_url,
        "DAGSTER_HOME": str(stack.dagster_home),
    }
    print(f"Config store migrated (schema version {version}) on 127.0.0.1:{cluster.port}.")
    print(f"Dagster UI: http://127.0.0.1:{port}  (Ctrl-C stops Dagster and the local PostgreSQL)",
          flush=True)
    command = [
        sys.executable, "-m", "dagster", "dev",
        "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port),
    ]
    child = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, preexec_fn=_reset_signals)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    finally:
        if not args.keep_postgres:
            stack.down()


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

    dev = commands.add_parser("dev", help="Start local PostgreSQL, migrate, run `dagster dev`.")
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000).")
    dev.add_argument("--keep-postgres", action="store_true", help="Leave PostgreSQL running.")
    dev.set_defaults(func=_cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RosettaError as exc:
        print(f"rosetta: {mask_secrets(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
