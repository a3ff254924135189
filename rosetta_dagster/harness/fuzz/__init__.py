"""The differential fuzzer: randomized, shrinking change sequences and faults against real
streams, with the source (and PostgreSQL's native logical replication) as oracles.

``run`` runs examples of one engine's state machine with Hypothesis; the test suite runs a
bounded profile with fixed seeds (``rosetta_dagster_tests/test_fuzz.py``) and
``./scripts/fuzz.sh --minutes N [--engine E]`` the long one. See ``machine`` for what an example
does.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import run_state_machine_as_test

from rosetta_dagster.harness.fuzz.machine import RosettaMachine, machine_for
from rosetta_dagster.harness.fuzz.world import FuzzWorld


@dataclass(frozen=True)
class Profile:
    examples: int  # per run
    steps: int  # at most, per example
    native: bool = False  # also compare PostgreSQL's native logical replication
    converge_timeout_s: float = 120.0
    shrink: bool = True
    database: str | None = None  # where Hypothesis keeps failing examples to replay first


def engine_snapshot_round(engine: str, round_seed: int) -> bool:
    """Debezium: one round in three loads by the engine's own snapshot (from the seed, so a
    round's seed replays it as it ran)."""
    return engine == "debezium" and round_seed % 3 == 0


def run(world: FuzzWorld, engine: str, profile: Profile, fixed_seed: int | None = None
        ) -> dict[str, int]:
    """Run ``profile.examples`` examples; raises with the (shrunk) failing script on a
    divergence. Returns how many examples, statements and faults ran."""
    machine: type[RosettaMachine] = machine_for(
        world, engine, native=profile.native, converge_timeout_s=profile.converge_timeout_s,
        engine_snapshot=fixed_seed is not None and engine_snapshot_round(engine, fixed_seed))
    if fixed_seed is not None:
        machine = seed(fixed_seed)(machine)
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if profile.shrink:
        phases.append(Phase.shrink)
    run_state_machine_as_test(machine, settings=settings(
        max_examples=profile.examples, stateful_step_count=profile.steps, deadline=None,
        suppress_health_check=list(HealthCheck), phases=phases, print_blob=True,
        database=DirectoryBasedExampleDatabase(profile.database) if profile.database else None,
    ))
    if machine.divergences:  # seen, though Hypothesis discarded the example that showed it
        raise AssertionError("A divergence in an example Hypothesis discarded (it ran out of "
                             "data mid-step); not shrunk:\n" + machine.divergences[0])
    return machine.stats


__all__ = ["FuzzWorld", "Profile", "run"]
