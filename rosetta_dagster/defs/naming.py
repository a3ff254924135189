"""The keys and attributes of the assets Rosetta builds, one naming per code location.

By default: ``source/<source>/<schema>/<table>``, ``destination/<destination>/<schema>/<table>``,
``replication_slot/<pipeline>`` and ``backfill/<pipeline>``, grouped by pipeline. A component's
``translation`` may change any of them; every builder and every runtime event (materializations
and observations of the stream, check results, the WAL monitor's readings) asks the same naming,
so nothing is reported to a key the definitions do not have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from dagster import AssetDep, AssetKey, AssetSpec

AssetKind = Literal["source_table", "destination_table", "replication_slot", "backfill"]


@dataclass(frozen=True)
class RosettaAsset:
    """One of Rosetta's assets as a translation sees it (the template variable ``asset``)."""

    kind: AssetKind
    pipeline: str
    source: str  # the source's name in rosetta.yaml
    table: str | None = None  # the source table, schema.name
    destination: str | None = None  # the destination's name in rosetta.yaml
    target: str | None = None  # the table written in the destination, schema.name


TranslateAsset = Callable[[AssetSpec, RosettaAsset], AssetSpec]


class AssetNaming:
    """Default specs in, the specs to build out; default keys in, the keys to report to."""

    def __init__(self, translate: TranslateAsset | None = None) -> None:
        self._translate = translate
        self._keys: dict[AssetKey, AssetKey] = {}

    def spec(self, default: AssetSpec, asset: RosettaAsset) -> AssetSpec:
        """The spec to build for ``default``; its dependencies follow the keys named before it
        (a destination table's source table is named first)."""
        if self._translate is None:
            return default
        translated = self._translate(default, asset)
        # A source table feeding several pipelines is one asset: its first name holds.
        key = self._keys.setdefault(default.key, translated.key)
        return translated.replace_attributes(
            key=key, deps=[AssetDep(self.key(dep.asset_key)) for dep in translated.deps])

    def key(self, default: AssetKey) -> AssetKey:
        """The key events about the asset of ``default`` key go to. An asset the definitions
        did not name (a table added to the file since they were loaded) keeps its default."""
        return self._keys.get(default, default)
