"""The Dagster layer loads, validates and materializes against a real config store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, Definitions, materialize

from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.definitions import defs
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.local_stack import LocalStack
from rosetta_dagster_tests.conftest import TEST_PASSWORD

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_definitions_load() -> None:
    Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    assert repository.has_job("config_store_upgrade")
    assert "config_store" in repository.get_top_level_resources()


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_config_db_asset_migrates_and_reports_pool_health(database_url: str) -> None:
    result = materialize(
        [config_db], resources={"config_store": ConfigStoreResource(database_url=database_url)}
    )
    assert result.success
    metadata = result.asset_materializations_for_node("config_db")[0].metadata
    assert metadata["schema_version"].value == 1
    assert metadata["pool_init_attempts"].value == 1
    assert metadata["pool_max_conn"].value == 10


def test_resource_with_wrong_password_fails_with_one_clear_sentence(database_url: str) -> None:
    bad_url = database_url.replace(TEST_PASSWORD, "nope")
    result = materialize(
        [config_db],
        resources={"config_store": ConfigStoreResource(database_url=bad_url)},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    text = str(failure.event_specific_data.error)
    assert 'password authentication failed for user "postgres"' in text
    assert "Could not connect to config_db at postgres@127.0.0.1:" in text
    assert TEST_PASSWORD not in text


def test_local_stack_brings_up_config_db_and_dagster_postgres_storage(pg_root: Path) -> None:
    stack = LocalStack(pg_root / "local-stack")
    cluster: LocalPostgresCluster = stack.up()
    try:
        instance = DagsterInstance.from_config(str(stack.dagster_home))
        assert instance.get_runs() == []
        assert "PostgresRunStorage" in type(instance.run_storage).__name__
        instance.dispose()
        env = (stack.root / "env.sh").read_text()
        assert f"127.0.0.1:{cluster.port}/config_db" in env
        assert oct((stack.root / "env.sh").stat().st_mode & 0o777) == "0o600"
    finally:
        cluster.destroy()


def _rosetta(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rosetta_dagster.cli", *args],
        capture_output=True, text=True, check=False, timeout=120, env={**os.environ, **env},
    )


def test_cli_reports_a_bad_config_database_url_in_one_line(database_url: str) -> None:
    cases = [
        ("mysql://u:pw-123@127.0.0.1/x", "uses the scheme 'mysql://'"),
        (database_url.replace(TEST_PASSWORD, "pw-123"), "password authentication failed"),
    ]
    for url, expected in cases:
        result = _rosetta("db", "upgrade", env={"CONFIG_DATABASE_URL": url})
        assert result.returncode == 2
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith("rosetta: ") and expected in last_line
        assert "pw-123" not in result.stderr + result.stdout


def test_cli_db_upgrade_and_status(database_url: str) -> None:
    env = {"CONFIG_DATABASE_URL": database_url}
    upgrade = _rosetta("db", "upgrade", env=env)
    assert "schema version 1 (1 migration(s) applied now)" in upgrade.stdout, upgrade.stderr
    again = _rosetta("db", "upgrade", env=env)
    assert "(0 migration(s) applied now)" in again.stdout
    status = _rosetta("db", "status", env=env)
    assert "schema version 1" in status.stdout
    assert TEST_PASSWORD not in upgrade.stdout + upgrade.stderr + status.stdout + status.stderr
