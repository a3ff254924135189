"""Rosetta as a Dagster component, for projects built with ``create-dagster`` and ``dg``.

``dg scaffold defs rosetta_dagster.RosettaReplicationComponent replication`` writes
``defs/replication/defs.yaml`` and a commented starter ``rosetta.yaml`` beside it; ``dg check
defs`` validates the attributes, ``dg list defs`` shows what it builds and ``dg dev`` runs it.
The component builds exactly what ``rosetta_dagster.defs.build.build_definitions`` builds for
its file: everything it builds (stream jobs, checks, backfill assets, sensors) reads that file
again at run time, for the ``${VAR}`` secrets, never ``$ROSETTA_CONFIG``.
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

from rosetta_dagster.core.pipeline_config import PipelineConfigError, PipelineFile
from rosetta_dagster.defs.build import build_definitions
from rosetta_dagster.defs.naming import RosettaAsset

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

    def pipeline_file(self, context: ComponentLoadContext) -> PipelineFile:
        path = Path(self.config)
        if not path.is_absolute():
            path = context.path / path
        selected = None if self.pipelines is None else frozenset(self.pipelines)
        return PipelineFile(path.resolve(), selected)

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        pipeline_file = self.pipeline_file(context)
        if not pipeline_file.path.exists():
            raise PipelineConfigError(
                f"{pipeline_file.path}: file not found (the component's config: {self.config}).")
        return build_definitions(pipeline_file,
                                 stream_run_tags=dict(self.stream_run_tags),
                                 translate=self.translation)
