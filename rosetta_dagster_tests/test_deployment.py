"""docker-compose cannot start on the project's machines (no Docker engine), so its consistency
with the code is checked here, and its init script and pipeline file are run for real."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, job, op, validate_run_config

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import load_config
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.defs.pipelines.jobs import PIPELINE_TAG
from rosetta_dagster.harness import (
    count_rows,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ROSETTA_SERVICES = ("compute", "webserver", "daemon", "api")
ENV_EXAMPLE = dict(
    line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
)


def _load_instance(instance_file: Path, cluster: LocalPostgresCluster, home: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster loads the instance file (its schema and every class it names, as the webserver
    and daemon do), its storage pointed at a test cluster instead of the compose service."""
    instance = yaml.safe_load(instance_file.read_text())
    database = instance["storage"]["postgres"]["postgres_db"]
    name = f"dagster_{home.name}"[:60].lower().replace("-", "_")
    cluster.create_database(name)
    database.update(hostname="127.0.0.1", port=cluster.port, username=cluster.superuser,
                    db_name=name)
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    monkeypatch.setenv(database["password"]["env"], cluster.password)
    with DagsterInstance.from_config(str(home)) as loaded:
        loaded.get_runs(limit=1)
        assert loaded.run_launcher is not None and loaded.run_coordinator is not None


def _conforms(schema: object, value: object) -> None:
    """``value`` is valid for the config ``schema`` (raises DagsterInvalidConfigError)."""
    @op(config_schema=schema)
    def configured() -> None: ...

    @job
    def probe() -> None:
        configured()

    validate_run_config(probe, {"ops": {"configured": {"config": value}}})


def _environment(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service].get("environment", {}).items()}


def _compose_references() -> set[str]:
    return set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))


def test_the_stack_has_every_service_with_health_checks_and_loopback_ports() -> None:
    assert set(SERVICES) == {"postgres", "source_db", *ROSETTA_SERVICES}
    for name in ("postgres", "source_db", "compute", "api"):
        assert SERVICES[name]["healthcheck"]["test"], name
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
    assert "127.0.0.1:3000:3000" in SERVICES["webserver"]["ports"]
    assert "127.0.0.1:8000:8000" in SERVICES["api"]["ports"]
    # The code server waits for healthy databases; the UI and the daemon for the code server.
    assert SERVICES["compute"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"}, "source_db": {"condition": "service_healthy"}}
    for name in ("webserver", "daemon"):
        assert SERVICES[name]["depends_on"] == {"compute": {"condition": "service_healthy"}}
    assert "wal_level=logical" in SERVICES["source_db"]["command"]


def test_every_file_the_stack_mounts_or_copies_exists() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).is_file(), (name, host)
            else:
                assert host in COMPOSE["volumes"], (name, host)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("# Rosetta") and "FROM python:3.12-slim" in dockerfile
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.MULTILINE):
        assert (ROOT / source).exists(), source


def test_every_setting_and_secret_the_code_needs_is_provided() -> None:
    for name in ROSETTA_SERVICES:
        environment = _environment(name)
        for variable in ("CONFIG_DATABASE_URL", "DAGSTER_HOME", "ROSETTA_CONFIG",
                         "ROSETTA_OFFSETS_DIR", "DAGSTER_PG_PASSWORD"):
            assert variable in environment, (name, variable)
    assert "ROSETTA_API_TOKEN" in _environment("api")
    # Every ${VAR} of the compose file is in .env.example (or has a default).
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in _compose_references():
        assert variable in ENV_EXAMPLE or f"{variable}:-" in text, variable
    # The pipeline file the containers load resolves with exactly the provided secrets.
    environment = _environment("compute")
    assert environment["ROSETTA_CONFIG"] == "/opt/rosetta/deploy/rosetta.yaml"
    resolved_env = {k: "x" for k in environment}
    config = load_config(ROOT / "deploy" / "rosetta.yaml", resolved_env)
    demo = config.pipeline("demo")
    assert demo.source.host == "source_db" and demo.destinations[0].host == "postgres"
    url = environment["CONFIG_DATABASE_URL"]
    assert "@postgres:5432/config_db" in url
    assert SERVICES["postgres"]["environment"]["POSTGRES_DB"] == "config_db"
    # Offsets survive restarts: a named volume where the streams (compute) write them.
    assert f"offsets:{environment['ROSETTA_OFFSETS_DIR']}" in SERVICES["compute"]["volumes"]


def test_the_dagster_instance_and_workspace_match_the_services(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    _load_instance(ROOT / "deploy" / "dagster.yaml", pg_cluster, tmp_path, monkeypatch)
    database = instance["storage"]["postgres"]["postgres_db"]
    assert database["hostname"] == "postgres" and database["scheme"] == "postgresql+psycopg2"
    assert database["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert f"CREATE DATABASE {database['db_name']} OWNER rosetta" in (
        ROOT / "deploy" / "postgres" / "init.sql").read_text()
    limits = instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert limits == [{"key": PIPELINE_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    # No overall limit: Dagster's default of 10 would keep an 11th pipeline from streaming.
    assert instance["run_coordinator"]["config"]["max_concurrent_runs"] == -1
    assert "max_runtime_seconds" not in instance["run_monitoring"]  # streams never end
    assert "COPY deploy/dagster.yaml /opt/dagster/home/dagster.yaml" in (ROOT / "Dockerfile").read_text()
    assert _environment("compute")["DAGSTER_HOME"] == "/opt/dagster/home"

    workspace = yaml.safe_load((ROOT / "deploy" / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    command = SERVICES["compute"]["command"]
    assert server["host"] == "compute"
    assert str(server["port"]) == command[command.index("-p") + 1]
    assert server["location_name"] == command[command.index("--location-name") + 1]
    for name in ("webserver", "daemon"):
        assert "/opt/rosetta/deploy/workspace.yaml" in SERVICES[name]["command"]


def _without_launcher(instance: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in instance.items() if key != "run_launcher"}


def test_the_docker_run_launcher_variant_runs_each_stream_in_its_own_container(
    tmp_path: Path, pg_cluster: LocalPostgresCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster_docker import DockerRunLauncher

    variant = ROOT / "deploy" / "docker-launcher"
    _load_instance(variant / "dagster.yaml", pg_cluster, tmp_path, monkeypatch)
    instance = yaml.safe_load((variant / "dagster.yaml").read_text())
    launcher = instance["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    _conforms(DockerRunLauncher.config_type(), launcher["config"])  # its schema
    config = launcher["config"]
    # Storage, run coordinator (one run per pipeline) and monitoring are the default stack's.
    default = yaml.safe_load((ROOT / "deploy" / "dagster.yaml").read_text())
    assert _without_launcher(instance) == _without_launcher(default)
    assert config["image"] == COMPOSE["x-rosetta"]["image"]
    assert config["network"] == f"{COMPOSE['name']}_default"
    assert config["container_kwargs"]["stop_timeout"] >= 30  # a stream closes cleanly first
    # Every secret the variant's pipelines reference, and the config store, reach the runs as
    # environment; no offsets volume: every pipeline keeps its offsets in config_db.
    pipelines = (variant / "rosetta.yaml").read_text()
    needed = set(re.findall(r"\$\{(\w+)\}", pipelines)) | {
        "CONFIG_DATABASE_URL", "DAGSTER_PG_PASSWORD", "DAGSTER_HOME", "ROSETTA_CONFIG"}
    assert needed <= set(config["env_vars"])
    assert set(config["env_vars"]) <= set(_environment("compute"))
    declared = load_config(variant / "rosetta.yaml", resolve_secrets=False).pipelines
    assert declared and all(p.settings.offset_store == "config_db" for p in declared.values())
    assert "ROSETTA_OFFSETS_DIR" not in config["env_vars"]
    # The override gives the launching services the socket and this instance, and the image
    # has the launcher installed.
    override = yaml.safe_load((ROOT / "docker-compose.docker-launcher.yml").read_text())
    for name in ("webserver", "daemon"):
        volumes = override["services"][name]["volumes"]
        assert "/var/run/docker.sock:/var/run/docker.sock" in volumes
        assert ("./deploy/docker-launcher/dagster.yaml:/opt/dagster/home/dagster.yaml:ro"
                in volumes)
    for name in ROSETTA_SERVICES:
        assert (override["services"][name]["environment"]["ROSETTA_CONFIG"]
                == "/opt/rosetta/deploy/docker-launcher/rosetta.yaml")
    assert 'pip install ".[docker]"' in (ROOT / "Dockerfile").read_text()
    assert '"dagster-docker==0.29.27"' in (ROOT / "pyproject.toml").read_text()


def test_the_helm_values_run_each_stream_in_its_own_pod() -> None:
    from dagster_k8s import K8sRunLauncher

    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "values.yaml").read_text())
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    k8s = launcher["config"]["k8sRunLauncher"]
    # What the chart renders into the instance's run_launcher config (it adds the namespace,
    # service account and instance config map itself), checked against the launcher's schema.
    rendered = {
        "instance_config_map": "dagster-instance", "service_account_name": "dagster",
        "job_namespace": "dagster",
        "env_secrets": [secret["name"] for secret in k8s["envSecrets"]],
        "env_vars": k8s["envVars"],
        "run_k8s_config": {"pod_spec_config": k8s["runK8sConfig"]["podSpecConfig"],
                           "container_config": k8s["runK8sConfig"]["containerConfig"]},
    }
    _conforms(K8sRunLauncher.config_type(), rendered)
    assert k8s["runK8sConfig"]["podSpecConfig"]["terminationGracePeriodSeconds"] >= 30
    config_file = "/opt/rosetta/deploy/docker-launcher/rosetta.yaml"  # offset_store: config_db
    assert f"ROSETTA_CONFIG={config_file}" in k8s["envVars"]
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert {"name": "ROSETTA_CONFIG", "value": config_file} in deployment["env"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "rosetta_dagster.definitions",
                                                "--location-name", "rosetta"]
    limits = values["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert limits == [{"key": PIPELINE_TAG, "value": {"applyLimitPerUniqueValue": True},
                       "limit": 1}]
    assert values["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] == -1


def test_the_source_init_script_gives_a_replicator_that_can_stream(
    pg_cluster: LocalPostgresCluster, pg_root: Path, store: ConfigStore
) -> None:
    """deploy/source_db/init.sh on a real server, then the demo pipeline as `replicator`."""
    env = new_streaming_env(pg_cluster, pg_root)
    psql_env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg_cluster.port),
                "PGPASSWORD": pg_cluster.password, "POSTGRES_USER": pg_cluster.superuser,
                "POSTGRES_DB": env.source_db, "SOURCE_DB_PASSWORD": "replicator-pw",
                "PATH": f"{pg_cluster.binaries.bin_dir}:{os.environ['PATH']}"}
    if shutil.which("psql", path=psql_env["PATH"]) is None:
        pytest.fail("psql is missing next to the PostgreSQL server binaries")
    init = subprocess.run(["sh", str(ROOT / "deploy" / "source_db" / "init.sh")], env=psql_env,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    document = yaml.safe_load((ROOT / "deploy" / "rosetta.yaml").read_text())
    document["sources"]["source_db"].update(host="127.0.0.1", port=pg_cluster.port,
                                            database=env.source_db)
    document["destinations"]["warehouse"].update(host="127.0.0.1", port=pg_cluster.port,
                                                 database=env.destination_db,
                                                 user=pg_cluster.superuser)
    document["pipelines"]["demo"]["streaming"] = {"heartbeat_interval_ms": 1000}
    path = pg_root / f"deploy-{env.source_db}.yaml"
    path.write_text(yaml.safe_dump(document))
    pipeline = load_config(path, {"SOURCE_DB_PASSWORD": "replicator-pw",
                                  "WAREHOUSE_DB_PASSWORD": pg_cluster.password}).pipeline("demo")
    store.sync_pipeline(pipeline)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        # The initial load (slot with exported snapshot, COPY) works for this user ...
        wait_until(lambda: count_rows(env.destination_url, "public.test_table") == 100, 90,
                   "the initial load")
        # ... and so does streaming a change through the engine.
        execute(env.source_url, "INSERT INTO public.test_table (id, data) VALUES (1001, 'streamed')")
        wait_until(lambda: session.progress.events_applied >= 1, 90, "a streamed change")
        # The heartbeat action query (pg_logical_emit_message) works for this user: with no
        # other writes, only its messages can move the slot past the current position.
        (position,) = fetch(env.source_url, "SELECT pg_current_wal_lsn()::text")[0]
        wait_until(lambda: fetch(env.source_url, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM "
                                 "pg_replication_slots WHERE slot_name = 'rosetta_demo'",
                                 (position,)) == [(True,)], 30, "a heartbeat to be confirmed")
