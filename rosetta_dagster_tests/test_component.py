"""Rosetta as a Dagster component: scaffolded and loaded as a ``dg`` project does, building what
``build_definitions`` builds, its translation reaching the events of real runs and sensors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, Definitions, build_sensor_context
from dagster.components.testing import DefsFolderSandbox, create_defs_folder_sandbox

from rosetta_dagster.component import RosettaReplicationComponent
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.pipeline_config import PipelineFile, load_config
from rosetta_dagster.defs.build import build_definitions
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.harness import StreamingEnv, execute, wait_until

COMPONENT_TYPE = "rosetta_dagster.component.RosettaReplicationComponent"


def describe(definitions: Definitions) -> dict[str, Any]:
    """What a code location shows: jobs (with their tags), assets (key, group, kinds, tags),
    checks, sensors, schedules."""
    repository = definitions.get_repository_def()
    graph = definitions.resolve_asset_graph()
    return {
        "jobs": {name: dict(repository.get_job(name).tags) for name in repository.job_names},
        "assets": {key.to_user_string(): (graph.get(key).group_name, sorted(graph.get(key).kinds),
                                          dict(graph.get(key).tags))
                   for key in graph.get_all_asset_keys()},
        "checks": sorted(f"{k.asset_key.to_user_string()}:{k.name}"
                         for k in graph.asset_check_keys),
        "sensors": sorted(s.name for s in repository.sensor_defs),
        "schedules": sorted(s.name for s in repository.schedule_defs),
    }


@pytest.fixture
def sandbox() -> Iterator[DefsFolderSandbox]:
    with create_defs_folder_sandbox() as folder:
        yield folder


def test_scaffolding_writes_a_defs_yaml_and_a_starter_file_that_load_as_build_definitions(
    sandbox: DefsFolderSandbox, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("APP_DB_PASSWORD", raising=False)  # secrets are not needed to load
    defs_path = sandbox.scaffold_component(RosettaReplicationComponent, defs_path="replication")
    assert yaml.safe_load((defs_path / "defs.yaml").read_text()) == {
        "type": COMPONENT_TYPE, "attributes": {"config": "rosetta.yaml"}}
    starter = defs_path / "rosetta.yaml"
    assert starter.read_text().startswith("# Rosetta pipelines of this component")
    assert list(load_config(starter, resolve_secrets=False).pipelines) == ["orders"]
    with sandbox.load_component_and_build_defs(defs_path) as (component, definitions):
        assert isinstance(component, RosettaReplicationComponent)
        Definitions.validate_loadable(definitions)
        assert describe(definitions) == describe(build_definitions(starter.resolve()))
    assert "stream_orders" in describe(definitions)["jobs"]


def _instance(sandbox: DefsFolderSandbox, folder: str, pipeline: str,
              translation: str = "") -> Path:
    """A component instance of its own folder and pipeline file (one pipeline, no secrets
    needed to load)."""
    defs_path = sandbox.defs_folder_path / folder
    defs_path.mkdir()
    endpoint = {"host": "127.0.0.1", "database": "d", "user": "u", "password": "${P}"}
    (defs_path / "rosetta.yaml").write_text(yaml.safe_dump({
        "sources": {"src": endpoint}, "destinations": {"dst": endpoint},
        "pipelines": {pipeline: {"source": "src", "destinations": ["dst"],
                                 "tables": [f"public.{pipeline}"]}}}))
    (defs_path / "defs.yaml").write_text(
        f"type: {COMPONENT_TYPE}\nattributes:\n  config: rosetta.yaml\n{translation}")
    return defs_path


def test_several_instances_share_one_platform_and_a_pipeline_declared_twice_is_refused(
    sandbox: DefsFolderSandbox,
) -> None:
    _instance(sandbox, "shop", "orders")
    _instance(sandbox, "finance", "ledger",
              "  translation:\n    key: \"finance/{{ spec.key.to_user_string() }}\"\n")
    with sandbox.build_all_defs() as definitions:
        Definitions.validate_loadable(definitions)
        shown = describe(definitions)
        repository = definitions.get_repository_def()
        graph = definitions.resolve_asset_graph()
        supervisor = repository.get_sensor_def("pipeline_supervisor")
        backfills = repository.get_sensor_def("backfill_jobs_sensor")
        health = definitions.resolve_job_def("replication_health_checks")
    # One platform: each sensor, the schedule and config_db once, serving both instances.
    assert shown["sensors"] == ["backfill_jobs_sensor", "notifications", "pipeline_supervisor",
                                "replication_slot_guard", "wal_monitor"]
    assert shown["schedules"] == ["replication_health_checks_schedule"]
    assert {"stream_orders", "stream_ledger", "set_pipeline_status",
            "config_store_upgrade"} <= set(shown["jobs"])
    assert sorted(job.name for job in supervisor.jobs) == ["stream_ledger", "stream_orders"]
    assert backfills.asset_selection is not None
    assert backfills.asset_selection.resolve(graph) == {
        AssetKey(["backfill", "orders"]), AssetKey(["finance", "backfill", "ledger"])}
    checked = {key.asset_key.to_user_string() for key in health.asset_layer.asset_graph.asset_check_keys}
    assert {"config_db", "destination/dst/public/orders",
            "finance/destination/dst/public/ledger"} <= checked
    # Each instance's assets under its own naming.
    assert "finance/replication_slot/ledger" in shown["assets"]
    assert "replication_slot/orders" in shown["assets"]

    _instance(sandbox, "again", "orders")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Dagster wraps what the component raised
        with sandbox.build_all_defs():
            pass
    causes, error = [], raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(re.fullmatch(r"Pipeline orders is declared by both \S*defs/(again|shop) and "
                            r"\S*defs/(again|shop): a code location runs each pipeline once\.", c)
               for c in causes), causes


def _translated_component(sandbox: DefsFolderSandbox, env: StreamingEnv) -> Path:
    defs_path = sandbox.defs_folder_path / "cdc"
    defs_path.mkdir()
    pipeline_file = env.write_pipeline_file(defs_path / "pipelines.yaml", "shop", ["public.items"])
    document = yaml.safe_load(pipeline_file.read_text())
    document["pipelines"]["other"] = {**document["pipelines"]["shop"], "tables": ["public.other"]}
    document["pipelines"]["shop"]["streaming"] = {"engine": "pgoutput"}
    pipeline_file.write_text(yaml.safe_dump(document))
    (defs_path / "defs.yaml").write_text(textwrap.dedent(f"""\
        type: {COMPONENT_TYPE}
        attributes:
          config: pipelines.yaml
          pipelines: [shop]
          translation:
            key: "cdc/{{{{ spec.key.to_user_string() }}}}"
            group_name: "replication_{{{{ asset.pipeline }}}}"
            tags:
              rosetta/kind: "{{{{ asset.kind }}}}"
          stream_run_tags:
            team: data
        """))
    return defs_path


@pytest.mark.parametrize("engine", ["pgoutput"])
def test_a_translated_component_names_every_asset_and_its_runs_and_sensors_report_there(
    sandbox: DefsFolderSandbox, env: StreamingEnv, store: ConfigStore, database_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text)",
            "INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 50) g",
            "CREATE TABLE public.other (id int PRIMARY KEY)")
    defs_path = _translated_component(sandbox, env)
    environment = env.pipeline_env(defs_path / "pipelines.yaml", database_url)
    # The component's file, not $ROSETTA_CONFIG, is what its runs and sensors read.
    environment["ROSETTA_CONFIG"] = str(tmp_path / "not-this-one.yaml")
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with sandbox.load_component_and_build_defs(defs_path) as (_, definitions):
        Definitions.validate_loadable(definitions)
        shown = describe(definitions)
    table = "cdc/destination/dst/replica/items"
    slot = "cdc/replication_slot/shop"
    kind = {"dagster/kind/postgres": ""}
    assert shown["assets"][table] == ("replication_shop", ["postgres"],
                                      {"rosetta/kind": "destination_table", **kind})
    assert shown["assets"]["cdc/source/src/public/items"][0] == "replication_shop"
    assert shown["assets"]["cdc/backfill/shop"] == ("replication_shop", ["postgres"],
                                                    {"rosetta/kind": "backfill", **kind})
    assert not [key for key in shown["assets"] if not key.startswith("cdc/")
                and key != "config_db"]
    assert not [key for key in shown["assets"] if "other" in key]  # not selected
    # Every check is on an asset the definitions have: nothing orphaned.
    assert {c.rsplit(":", 1)[0] for c in shown["checks"]} <= set(shown["assets"])
    assert f"{slot}:stream_health" in shown["checks"]
    assert shown["jobs"]["stream_shop"] == {"team": "data", "rosetta/pipeline": "shop"}
    assert "stream_other" not in shown["jobs"]
    graph = definitions.resolve_asset_graph()
    assert graph.get(AssetKey.from_user_string(table)).parent_keys == {
        AssetKey.from_user_string("cdc/source/src/public/items")}

    _stream_until_the_load_is_materialized(sandbox, defs_path, environment, table, tmp_path)

    # The WAL monitor's reading and the scheduled checks report to the translated keys too.
    resources = {"config_store": ConfigStoreResource(database_url=database_url)}
    with DagsterInstance.ephemeral() as instance:
        sensor = definitions.resolve_sensor_def("wal_monitor")
        with build_sensor_context(instance=instance, definitions=definitions,
                                  resources=resources) as context:
            result = sensor(context)
        observed = {event.asset_key.to_user_string() for event in result.asset_events}
        assert slot in observed and table in observed, observed
        checks = definitions.resolve_job_def("replication_health_checks").execute_in_process(
            instance=instance, resources=resources, raise_on_error=False)
    evaluated = {(e.asset_key.to_user_string(), e.check_name): e.passed
                 for e in checks.get_asset_check_evaluations()}
    assert evaluated[(table, "row_count_parity")] is True
    assert (slot, "slot_active") in evaluated


def _stream_until_the_load_is_materialized(sandbox: DefsFolderSandbox, defs_path: Path,
                                           environment: dict[str, str], table: str,
                                           tmp_path: Path) -> None:
    """The component's stream job, run in a process of its own as a run would be, until the
    initial load's materialization is in the instance; then it is terminated."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    script = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(sandbox.project_root / "src")!r})
        from dagster import DagsterInstance
        from dagster.components import load_from_defs_folder
        definitions = load_from_defs_folder(project_root=__import__("pathlib").Path(
            {str(sandbox.project_root)!r}))
        definitions.resolve_job_def("stream_shop").execute_in_process(
            instance=DagsterInstance.get())
        """)
    log = tmp_path / "stream.log"
    # The instance's storage is created here first: two processes creating it at once collide.
    with DagsterInstance.from_config(str(home)) as instance, log.open("wb") as output:
        instance.get_runs(limit=1)
        assert instance.get_latest_materialization_event(AssetKey.from_user_string(table)) is None
        process = subprocess.Popen([sys.executable, "-c", script],
                                   env={**os.environ, **environment, "DAGSTER_HOME": str(home)},
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: process.poll() is None and instance.get_latest_materialization_event(
                AssetKey.from_user_string(table)) is not None, 120,
                "the initial load's materialization on the translated key")
        except AssertionError:
            print(log.read_text(errors="replace")[-5000:])
            raise
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


def test_a_pipeline_file_the_component_does_not_find_is_one_clear_sentence(
    sandbox: DefsFolderSandbox,
) -> None:
    defs_path = sandbox.defs_folder_path / "missing"
    defs_path.mkdir()
    (defs_path / "defs.yaml").write_text(
        f"type: {COMPONENT_TYPE}\nattributes:\n  config: nowhere.yaml\n")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Dagster wraps what the component raised
        with sandbox.load_component_and_build_defs(defs_path):
            pass
    causes, error = [], raised.value
    while error is not None:
        causes.append(str(error))
        error = error.__cause__ or error.__context__
    expected = (f"{(defs_path / 'nowhere.yaml').resolve()}: file not found (the component's "
                "config: nowhere.yaml).")
    assert expected in causes, causes


def test_the_pipeline_file_of_a_selection_must_declare_it(tmp_path: Path) -> None:
    from rosetta_dagster.core.pipeline_config import PipelineConfigError

    path = tmp_path / "rosetta.yaml"
    path.write_text("sources: {src: {host: h, database: d, user: u, password: '${P}'}}\n"
                    "destinations: {dst: {host: h, database: d, user: u, password: '${P}'}}\n"
                    "pipelines: {orders: {source: src, destinations: [dst], tables: [public.t]}}\n")
    selected = PipelineFile(path, frozenset({"orders"})).load(resolve_secrets=False)
    assert list(selected.pipelines) == ["orders"] and selected.selected == {"orders"}
    with pytest.raises(PipelineConfigError, match="pipeline 'shop' is not declared"):
        PipelineFile(path, frozenset({"shop"})).load(resolve_secrets=False)


def test_dg_scaffolds_checks_and_reports_a_bad_attribute_with_its_file_and_line(
    tmp_path: Path,
) -> None:
    """The ``dg`` CLI on a project laid out as ``create-dagster`` lays it out."""
    project = tmp_path / "shop"
    package = project / "src" / "shop"
    (package / "defs").mkdir(parents=True)
    (package / "__init__.py").touch()
    (package / "defs" / "__init__.py").touch()
    (package / "definitions.py").write_text(textwrap.dedent("""\
        from pathlib import Path

        from dagster import definitions, load_from_defs_folder


        @definitions
        def defs():
            return load_from_defs_folder(path_within_project=Path(__file__).parent)
        """))
    (project / "pyproject.toml").write_text(textwrap.dedent("""\
        [project]
        name = "shop"
        version = "0.1.0"

        [tool.dg]
        directory_type = "project"

        [tool.dg.project]
        root_module = "shop"
        registry_modules = ["rosetta_dagster"]
        """))
    bin_dir = Path(sys.executable).parent
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "PYTHONPATH": str(project / "src")}

    def dg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(bin_dir / "dg"), *args], cwd=project, env=environment,
                              capture_output=True, text=True, timeout=120)

    scaffolded = dg("scaffold", "defs", "rosetta_dagster.RosettaReplicationComponent",
                    "replication")
    assert scaffolded.returncode == 0, scaffolded.stdout + scaffolded.stderr
    defs_yaml = package / "defs" / "replication" / "defs.yaml"
    assert yaml.safe_load(defs_yaml.read_text()) == {
        "type": "rosetta_dagster.RosettaReplicationComponent",
        "attributes": {"config": "rosetta.yaml"}}
    assert (defs_yaml.parent / "rosetta.yaml").exists()
    checked = dg("check", "defs")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully." in checked.stdout + checked.stderr

    defs_yaml.write_text("type: rosetta_dagster.RosettaReplicationComponent\n\n"
                         "attributes:\n  config: rosetta.yaml\n  pipelines: 5\n")
    refused = dg("check", "defs")
    assert refused.returncode == 1
    assert f"{defs_yaml}:5 - rosetta_dagster.RosettaReplicationComponent attributes.pipelines" \
        in refused.stdout + refused.stderr, refused.stdout + refused.stderr
