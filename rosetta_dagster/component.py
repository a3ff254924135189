"""Rosetta as a Dagster component, for projects built with ``create-dagster`` and ``dg``.

``dg scaffold defs rosetta_dagster.RosettaReplicationComponent replication`` writes
``defs/replication/defs.yaml`` and a commented starter ``rosetta.yaml`` beside it; ``dg check
defs`` validates the attributes, ``dg list defs`` shows what it builds and ``dg dev`` runs it.
The component builds exactly what ``rosetta_dagster.defs.build.build_definitions`` builds for
its file: everything it builds (stream jobs, checks, backfill assets, sensors) reads that file
again at run time, for the ``${VAR}`` secrets, never ``$ROSETTA_CONFIG``. With several
instances in one code location, each builds its own pipelines' assets and checks; the first (in
load order) also builds the platform part for all of them (stream jobs, sensors, health-check
job, ``config_db``); a pipeline name declared by two instances is refused.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from dagster import Definitions
from dagster.components import (
    Component,
    ComponentLoadContext,
    Resolvable,
    Scaffolder,
    ScaffoldRequest,
    scaffold_component,
    scaffold_with,
)
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver
from pydantic import BaseModel

from rosetta_dagster.core.pipeline_config import PipelineConfigError, PipelineFile
from rosetta_dagster.defs.build import build_platform_definitions, replication_set_definitions
from rosetta_dagster.defs.naming import AssetNaming, RosettaAsset
from rosetta_dagster.defs.platform.logs import ensure_process_logging
from rosetta_dagster.defs.replication_set import ReplicationSet, refuse_shared_pipelines

STARTER_PIPELINE_FILE = """\
# Rosetta pipelines of this component (the full reference: docs/manual.md of Rosetta).
# Secrets are ${VAR} references, resolved when a run starts, never written here.
sources:
  app:
    host: 127.0.0.1
    port: 5432
    database: app
    user: rosetta
    password: ${APP_DB_PASSWORD}
destinations:
  replica:
    host: 127.0.0.1
    port: 5432
    database: replica
    user: rosetta
    password: ${REPLICA_DB_PASSWORD}
    schema: public
pipelines:
  orders:
    source: app
    destinations: [replica]
    tables: [public.orders]
    # streaming:
    #   engine: pgoutput        # or debezium (the default)
# operations:
#   supervisor_interval_seconds: 15
"""


class RosettaReplicationScaffolder(Scaffolder):
    """``defs.yaml`` pointing at a starter ``rosetta.yaml`` in the same folder."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        scaffold_component(request, {"config": "rosetta.yaml"})
        pipeline_file = request.target_path / "rosetta.yaml"
        if not pipeline_file.exists():
            pipeline_file.write_text(STARTER_PIPELINE_FILE)


def _translation_variables(asset: RosettaAsset) -> Mapping[str, object]:
    return {"asset": asset}


@scaffold_with(RosettaReplicationScaffolder)
@dataclass
class RosettaReplicationComponent(Component, Resolvable):
    """PostgreSQL tables replicated into other databases in real time by Rosetta: one streaming
    job per pipeline of ``config`` (kept running by the pipeline supervisor sensor), its source
    and destination tables and replication slot as assets with health checks, a backfill asset
    per pipeline, and the sensors that operate them.

    ``translation`` receives each asset's default spec as ``spec`` and what it is as ``asset``
    (``asset.kind``: source_table, destination_table, replication_slot or backfill;
    ``asset.pipeline``, ``asset.source``, ``asset.table``, ``asset.destination``,
    ``asset.target``). The stream's materializations, the checks and the WAL monitor report to
    the translated keys.
    """

    # The pipeline file, relative to this component's folder.
    config: str = "rosetta.yaml"
    # Which of its pipelines this component runs (all of them when omitted).
    pipelines: list[str] | None = None
    translation: Annotated[
        TranslationFn[RosettaAsset], TranslationFnResolver(_translation_variables)
    ] | None = None
    # Tags on the stream jobs' runs, e.g. a run launcher's settings (dagster-k8s/config).
    stream_run_tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, attributes: BaseModel | None, context: ComponentLoadContext
             ) -> "RosettaReplicationComponent":
        component = super().load(attributes, context)
        component.replication_set(context)  # so that the first instance can serve it too
        return component

    def pipeline_file(self, context: ComponentLoadContext) -> PipelineFile:
        path = Path(self.config)
        if not path.is_absolute():
            path = context.path / path
        selected = None if self.pipelines is None else frozenset(self.pipelines)
        return PipelineFile(path.resolve(), selected)

    def replication_set(self, context: ComponentLoadContext) -> ReplicationSet:
        """What this instance replicates (made once: its naming is filled as it builds)."""
        made: ReplicationSet | None = self.__dict__.get("_replication_set")
        if made is None:
            try:
                where = str(context.path.relative_to(context.project_root))
            except ValueError:
                where = str(context.path)
            made = ReplicationSet(self.pipeline_file(context), AssetNaming(self.translation),
                                  dict(self.stream_run_tags), declared_by=where)
            self.__dict__["_replication_set"] = made
        return made

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        ensure_process_logging()
        own = self.replication_set(context)
        if not own.file.path.exists():
            raise PipelineConfigError(
                f"{own.file.path}: file not found (the component's config: {self.config}).")
        # Every instance of the code location, in load order; the first serves them all.
        instances = [c.__dict__.get("_replication_set") for c in
                     context.component_tree.get_all_components(RosettaReplicationComponent)]
        sets = [s for s in instances if s is not None]
        if own not in sets:  # built outside a component tree (e.g. from Python)
            sets = [own]
        refuse_shared_pipelines(sets)
        definitions = replication_set_definitions(own)
        if sets[0] is own:
            definitions = Definitions.merge(definitions, build_platform_definitions(sets))
        return definitions
