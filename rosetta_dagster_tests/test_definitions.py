"""The Dagster layer loads, validates and materializes against a real config store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, Definitions, materialize

from rosetta_dagster.core.config_store import load_migrations
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import PipelineConfigError, PipelineFile
from rosetta_dagster.definitions import build_definitions, defs
from rosetta_dagster.defs.platform.assets import config_db
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.local_stack import LocalStack
from rosetta_dagster_tests.conftest import TEST_PASSWORD

LATEST = len(load_migrations())

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_definitions_load() -> None:
    Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    assert repository.has_job("config_store_upgrade")
    assert "config_store" in repository.get_top_level_resources()


def test_dg_checks_the_repository_code_location(
    tmp_path: Path, pg_cluster: LocalPostgresCluster,
) -> None:
    """``dg check defs`` in the repository (pyproject's ``[tool.dg]``) loads the workspace's
    module, here with a pipeline of the file ``$ROSETTA_CONFIG`` names."""
    environment = {**os.environ, "DAGSTER_HOME": str(tmp_path),
                   "ROSETTA_CONFIG": str(_pipeline_file(tmp_path, pg_cluster, "shop"))}

    checked = subprocess.run([str(Path(sys.executable).parent / "dg"), "check", "defs"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                             env=environment, timeout=180)
    assert checked.returncode == 0, (checked.stdout + checked.stderr)[-3000:]
    assert "All definitions loaded successfully." in checked.stdout + checked.stderr


def test_config_db_asset_migrates_and_reports_pool_health(database_url: str) -> None:
    result = materialize(
        [config_db], resources={"config_store": ConfigStoreResource(database_url=database_url)}
    )
    assert result.success
    metadata = result.asset_materializations_for_node("config_db")[0].metadata
    assert metadata["schema_version"].value == LATEST
    assert metadata["pool_init_attempts"].value == 1
    assert metadata["pool_max_conn"].value == 10


def test_sensor_ticks_and_steps_of_one_process_share_one_config_store_pool(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The code server evaluates every sensor tick in one process: the first opens the pool
    (the checklist's start-up line, once), the next ones reuse it; its connections stay few."""
    import logging

    import psycopg2
    from dagster import build_init_resource_context

    caplog.set_level(logging.INFO, logger="rosetta.pool")
    resource = ConfigStoreResource(database_url=database_url)
    pools = set()
    for _ in range(5):  # five ticks
        context = build_init_resource_context()
        resource.setup_for_execution(context)
        pools.add(id(resource.pool))
        assert resource.store.schema_version() > 0
        resource.teardown_after_execution(context)
    opened = [r for r in caplog.records
              if r.getMessage() == "Connection pool initialized successfully on attempt 1"]
    assert len(pools) == 1 and len(opened) == 1
    with psycopg2.connect(database_url) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND application_name LIKE 'rosetta%%'")
        assert cursor.fetchone()[0] <= 2  # type: ignore[index]
    conn.close()


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


def test_local_stack_brings_up_config_db_and_dagster_postgres_storage(
    pg_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = LocalStack(pg_root / "local-stack")
    cluster: LocalPostgresCluster = stack.up()
    try:
        assert cluster.password not in (stack.dagster_home / "dagster.yaml").read_text()
        monkeypatch.setenv("ROSETTA_LOCAL_PG_PASSWORD", cluster.password)
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
    expected = f"schema version {LATEST} ({LATEST} migration(s) applied now)"
    assert expected in upgrade.stdout, upgrade.stderr
    again = _rosetta("db", "upgrade", env=env)
    assert "(0 migration(s) applied now)" in again.stdout
    status = _rosetta("db", "status", env=env)
    assert f"schema version {LATEST}" in status.stdout
    assert TEST_PASSWORD not in upgrade.stdout + upgrade.stderr + status.stdout + status.stderr


def _pipeline_file(tmp_path: Path, cluster: LocalPostgresCluster, source_db: str) -> Path:
    endpoint = (f"{{host: 127.0.0.1, port: {cluster.port}, user: postgres, "
                f"password: '${{TEST_PG_PASSWORD}}'")
    path = tmp_path / "rosetta.yaml"
    path.write_text(
        f"sources:\n  src: {endpoint}, database: {source_db}}}\n"
        f"destinations:\n  dst: {endpoint}, database: {source_db}, schema: replica}}\n"
        "pipelines:\n  shop:\n    source: src\n    destinations: [dst]\n"
        "    tables: [public.orders]\n"
    )
    return path


def test_definitions_from_the_pipeline_file(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROSETTA_CONFIG", str(_pipeline_file(tmp_path, pg_cluster, "shop")))
    monkeypatch.delenv("TEST_PG_PASSWORD", raising=False)  # secrets are not needed to load
    built = build_definitions()
    Definitions.validate_loadable(built)
    repository = built.get_repository_def()
    job = repository.get_job("stream_shop")
    assert job.tags["rosetta/pipeline"] == "shop"
    graph = repository.asset_graph
    destination = AssetKey(["destination", "dst", "replica", "orders"])
    assert graph.get(destination).parent_keys == {AssetKey(["source", "src", "public", "orders"])}


def test_definitions_of_some_pipelines_of_the_file(
    tmp_path: Path, pg_cluster: LocalPostgresCluster
) -> None:
    path = _pipeline_file(tmp_path, pg_cluster, "shop")
    document = yaml.safe_load(path.read_text())
    document["pipelines"]["ledger"] = {**document["pipelines"]["shop"],
                                       "tables": ["public.ledger"]}
    path.write_text(yaml.safe_dump(document))
    everything = build_definitions(path).get_repository_def()
    assert {"stream_shop", "stream_ledger"} <= set(everything.job_names)
    some = build_definitions(PipelineFile(path, frozenset({"ledger"}))).get_repository_def()
    assert "stream_ledger" in some.job_names and "stream_shop" not in some.job_names
    assert AssetKey(["backfill", "shop"]) not in some.assets_defs_by_key
    with pytest.raises(PipelineConfigError, match="pipeline 'orders' is not declared"):
        build_definitions(PipelineFile(path, frozenset({"orders"})))


def test_stream_job_failure_is_one_sentence_in_the_dagster_log(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source_db = database_url.rsplit("/", 1)[1]
    path = _pipeline_file(tmp_path, pg_cluster, source_db)
    # The run reads the file the definitions were built from, not $ROSETTA_CONFIG.
    monkeypatch.setenv("ROSETTA_CONFIG", str(tmp_path / "not-this-one.yaml"))
    monkeypatch.setenv("TEST_PG_PASSWORD", "wrong-pw")
    job = build_definitions(path, stream_run_tags={"team": "data"}).get_repository_def(
        ).get_job("stream_shop")
    assert job.tags == {"team": "data", "rosetta/pipeline": "shop"}
    instance = DagsterInstance.ephemeral()
    result = job.execute_in_process(
        resources={"config_store": ConfigStoreResource(database_url=database_url)},
        raise_on_error=False,
        instance=instance,
    )
    assert not result.success
    expected = (f"Pipeline shop: could not connect to source src at postgres@127.0.0.1:"
                f"{pg_cluster.port}/{source_db}: password authentication failed for user "
                '"postgres".')
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    cause = failure.event_specific_data.error.cause
    assert cause.cls_name == "DatabaseConnectionError"
    assert cause.message.strip() == f"rosetta_dagster.core.errors.DatabaseConnectionError: {expected}"
    log_lines = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert expected in log_lines  # the op's own ERROR line in the run's log
    assert not any("wrong-pw" in line for line in log_lines)


def test_cli_pipeline_sync_start_pause_and_list(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, database_url: str
) -> None:
    env = {"CONFIG_DATABASE_URL": database_url,
           "ROSETTA_CONFIG": str(_pipeline_file(tmp_path, pg_cluster, "shop"))}
    synced = _rosetta("pipeline", "sync", env=env)
    assert synced.stdout == "shop\tPAUSE\tPAUSED\t\n", synced.stderr
    assert _rosetta("pipeline", "start", "shop", env=env).stdout == "Pipeline shop: status START\n"
    assert _rosetta("pipeline", "list", env=env).stdout == "shop\tSTART\tPAUSED\t\n"
    assert _rosetta("pipeline", "pause", "shop", env=env).stdout == "Pipeline shop: status PAUSE\n"
    unknown = _rosetta("pipeline", "start", "nope", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().endswith("Pipeline 'nope' does not exist in the config store.")


def test_cli_pipeline_status_and_backfill_request_list_cancel(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, database_url: str
) -> None:
    env = {"CONFIG_DATABASE_URL": database_url,
           "ROSETTA_CONFIG": str(_pipeline_file(tmp_path, pg_cluster, "shop"))}
    _rosetta("pipeline", "sync", env=env)
    status = _rosetta("pipeline", "status", "shop", env=env)
    assert status.returncode == 0, status.stderr
    assert "status:       PAUSE" in status.stdout and "tables:       public.orders" in status.stdout

    requested = _rosetta("backfill", "request", "shop", "public.orders", "--where", "id >= 10",
                         "--where", "note = '; DROP TABLE x; --", "--where", "note is not null",
                         env=env)
    assert requested.stdout == "Backfill job 1: shop public.orders PENDING\n", requested.stderr
    listed = _rosetta("backfill", "list", "--status", "pending", env=env)
    assert listed.stdout == "1\tshop\tpublic.orders\tPENDING\t0/?\t+0 ~0 -0\t\n"
    assert _rosetta("backfill", "cancel", "1", env=env).stdout == "Backfill job 1: CANCELLED\n"

    for args, message in (
        (("public.nope",), "Pipeline 'shop' has no table 'public.nope' (it has public.orders)."),
        (("public.orders", "--where", "id drop 1"), "--where 'id drop 1': unknown operator"),
        (("public.orders", "--where", "id between 1"), "'between' needs a list of two values."),
    ):
        refused = _rosetta("backfill", "request", "shop", *args, env=env)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_warehouse_destination_table_assets_have_their_kind(
    tmp_path: Path, pg_cluster: LocalPostgresCluster
) -> None:
    path = _pipeline_file(tmp_path, pg_cluster, "shop")
    document = yaml.safe_load(path.read_text())
    document["destinations"]["lake"] = {"type": "duckdb", "path": "lake.duckdb"}
    document["destinations"]["wh"] = {"type": "snowflake", "account": "acct", "user": "R",
                                      "database": "DB", "schema": "replica",
                                      "password": "${SNOWFLAKE_PASSWORD}"}
    document["pipelines"]["shop"]["destinations"] = ["dst", "lake", "wh"]
    path.write_text(yaml.safe_dump(document))
    graph = build_definitions(path).get_repository_def().asset_graph
    assert graph.get(AssetKey(["destination", "lake", "main", "orders"])).kinds == {"duckdb"}
    assert graph.get(AssetKey(["destination", "wh", "replica", "orders"])).kinds == {"snowflake"}
    assert graph.get(AssetKey(["destination", "dst", "replica", "orders"])).kinds == {"postgres"}
    assert graph.get(AssetKey(["backfill", "shop"])).kinds == {"postgres", "duckdb", "snowflake"}
