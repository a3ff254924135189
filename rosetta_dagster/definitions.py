"""Dagster definitions of Rosetta (``dg dev -w workspace.yaml`` and ``dg check defs`` load ``defs``).

``defs`` is built from ``rosetta.yaml`` (or ``$ROSETTA_CONFIG``), read when the code location
loads; without that file only the platform assets load. In a ``dg`` project, use the component
instead (``rosetta_dagster.RosettaReplicationComponent``).
"""

from rosetta_dagster.defs.build import HEALTH_CHECKS_JOB, build_definitions

__all__ = ["HEALTH_CHECKS_JOB", "build_definitions", "defs"]

defs = build_definitions()
