"""The differential fuzzer's bounded profile: fixed seeds, a few examples per engine.

Each example is a random sequence of changes (two connections, interleaved transactions,
savepoints, key updates, TOAST-sized and hostile values, TRUNCATE, schema changes) and faults
(kill -9 of the stream, restarts of the source and of each destination, a dropped slot, a
destination down, backfills) against a real stream; the destinations must end exactly equal to
the source. The long profile is ``./scripts/fuzz.sh --minutes N`` (see docs/development.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rosetta_dagster.harness.fuzz import FuzzWorld, Profile, run

# Seeds and example counts of the bounded profile, per engine (under a minute each here; the
# long profile is where the fuzzer hunts: ./scripts/fuzz.sh --minutes N).
BOUNDED = {"pgoutput": (20261203, 6), "debezium": (20261204, 3)}
STEPS = 30


@pytest.fixture(scope="module")
def fuzz_world(pg_root: Path) -> Iterator[FuzzWorld]:
    world = FuzzWorld.start(pg_root / "fuzz")
    yield world
    world.close()


def test_random_change_sequences_and_faults_leave_every_destination_exact(
    fuzz_world: FuzzWorld, engine: str
) -> None:
    seed, examples = BOUNDED[engine]
    try:
        stats = run(fuzz_world, engine, Profile(examples=examples, steps=STEPS, shrink=False),
                    fixed_seed=seed)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nTo shrink it to a minimal script: ./scripts/fuzz.sh --engine {engine} "
            f"--seed {seed} --examples {examples} --steps {STEPS}") from None
    assert stats["examples"] >= examples and stats["statements"] > 0
