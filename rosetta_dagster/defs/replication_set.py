"""What one code location replicates: one or more pipeline files, each with its asset naming.

The workspace's ``rosetta.yaml`` is one replication set; in a ``dg`` project each instance of
the component is one. The platform (supervisor, slot guard, WAL monitor, backfill and
notification sensors, health-check job, ``config_db``) exists once per code location and serves
every set; each set's assets, checks and stream jobs are its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from rosetta_dagster.core.pipeline_config import (
    OperationsSettings,
    PipelineConfigError,
    PipelineDefinition,
    PipelineFile,
    RosettaConfig,
)
from rosetta_dagster.defs.naming import AssetNaming


@dataclass(frozen=True, eq=False)  # identity: the definitions built from it are cached by it
class ReplicationSet:
    file: PipelineFile
    naming: AssetNaming = field(default_factory=AssetNaming)
    # Tags on its stream jobs' runs, e.g. a run launcher's settings.
    stream_run_tags: Mapping[str, str] = field(default_factory=dict)
    # Where it is declared, for messages (a component's folder; the file itself otherwise).
    declared_by: str = ""

    @classmethod
    def of(cls, config: RosettaConfig, naming: AssetNaming | None = None) -> ReplicationSet:
        return cls(config.file, naming or AssetNaming())

    @property
    def origin(self) -> str:
        return self.declared_by or str(self.file.path)

    def declared(self) -> RosettaConfig | None:
        """The file as the definitions see it (no secrets), None when it does not exist: read
        once per set (the builders and every sensor's settings ask it while the code location
        loads; the sensors read the file again at each tick, with its secrets)."""
        return self._declared

    @cached_property
    def _declared(self) -> RosettaConfig | None:
        return self.file.load(resolve_secrets=False) if self.file.path.exists() else None

    def declared_pipelines(self) -> dict[str, PipelineDefinition]:
        config = self.declared()
        return config.pipelines if config is not None else {}


def operations_of(sets: Sequence[ReplicationSet]) -> OperationsSettings:
    """The platform's settings (sensor intervals, shared thresholds): the first set's."""
    for replication_set in sets:
        config = replication_set.declared()
        if config is not None:
            return config.operations
    return OperationsSettings()


def current_pipelines(sets: Sequence[ReplicationSet], *, resolve_secrets: bool = True
                      ) -> Iterator[tuple[ReplicationSet, RosettaConfig, PipelineDefinition]]:
    """Every pipeline of every set as its file reads now (the sensors' view at each tick)."""
    for replication_set in sets:
        config = replication_set.file.load(resolve_secrets=resolve_secrets)
        for pipeline in config.pipelines.values():
            yield replication_set, config, pipeline


def refuse_shared_pipelines(sets: Sequence[ReplicationSet]) -> None:
    """A code location runs each pipeline once: two sets declaring one name are refused."""
    owners: dict[str, ReplicationSet] = {}
    for replication_set in sets:
        for name in replication_set.declared_pipelines():
            first = owners.setdefault(name, replication_set)
            if first is not replication_set:
                raise PipelineConfigError(
                    f"Pipeline {name} is declared by both {first.origin} and "
                    f"{replication_set.origin}: a code location runs each pipeline once.")
