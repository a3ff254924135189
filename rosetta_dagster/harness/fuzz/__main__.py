"""``python -m rosetta_dagster.harness.fuzz --minutes N [--engine E]``: the long profile.

Runs rounds of examples on fresh random seeds until the time is up, alternating engines, and
stops at the first divergence with its shrunk SQL script (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from rosetta_dagster.harness.fuzz import FuzzWorld, Profile, engine_snapshot_round, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuzz", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--engine", choices=("pgoutput", "debezium", "both"), default="both")
    parser.add_argument("--steps", type=int, default=40, help="steps per example, at most")
    parser.add_argument("--examples", type=int, default=5, help="examples per round")
    parser.add_argument("--seed", type=int, help="one round with this seed")
    parser.add_argument("--no-native", action="store_true",
                        help="do not run PostgreSQL's native replication beside it")
    parser.add_argument("--no-shrink", action="store_true",
                        help="report the first failing example as it is (faster)")
    parser.add_argument("--out", type=Path, default=Path("tmp/fuzz"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    engines = ("pgoutput", "debezium") if args.engine == "both" else (args.engine,)
    profile = Profile(examples=args.examples, steps=args.steps, native=not args.no_native,
                      shrink=not args.no_shrink, database=str(args.out / "examples"))
    world = FuzzWorld.start(Path(tempfile.mkdtemp(prefix="rosetta-fuzz-")))

    def terminate(_signum: int, _frame: object) -> None:
        world.close()  # its servers and stream processes would outlive this one
        os._exit(143)

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    rounds = 0
    try:
        while True:
            engine = engines[rounds % len(engines)]
            round_seed = args.seed if args.seed is not None else random.randrange(2**32)
            began = time.monotonic()
            snapshot = " (loaded by the engine's snapshot)" if engine_snapshot_round(
                engine, round_seed) else ""
            print(f"[{(began - started) / 60:5.1f} min] {engine}: {args.examples} example(s), "
                  f"seed {round_seed}{snapshot}", flush=True)
            try:
                run(world, engine, profile, fixed_seed=round_seed)
            except Exception:  # noqa: BLE001 - the report is the product of this command
                report = traceback.format_exc()
                path = args.out / f"divergence-{engine}-{round_seed}.txt"
                path.write_text(report)
                print(report, file=sys.stderr)
                print(f"fuzz: divergence found ({engine}, seed {round_seed}); written to {path}",
                      file=sys.stderr)
                return 1
            rounds += 1
            print(f"           clean in {time.monotonic() - began:.0f} s", flush=True)
            if args.seed is not None or time.monotonic() > deadline:
                break
    finally:
        world.close()
    print(f"fuzz: {rounds} round(s) clean in {(time.monotonic() - started) / 60:.1f} min "
          f"({', '.join(engines)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
