"""Rosetta: PostgreSQL change-data-capture pipelines orchestrated by Dagster.

``rosetta_dagster.RosettaReplicationComponent`` is the Dagster component (``dg``'s registry lists
this package); it is imported on first use, so the Dagster-free core stays free of Dagster.
"""

from typing import Any

COMPONENTS = ("RosettaReplicationComponent",)


def __getattr__(name: str) -> Any:
    if name in COMPONENTS:
        from rosetta_dagster import component

        return getattr(component, name)
    raise AttributeError(f"module 'rosetta_dagster' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *COMPONENTS])
