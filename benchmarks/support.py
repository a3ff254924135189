"""What every benchmark needs: a throwaway PostgreSQL cluster with a source and a destination."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster_tests.streaming_support import StreamingEnv, new_streaming_env


@contextmanager
def benchmark_env() -> Iterator[StreamingEnv]:
    root = Path(tempfile.mkdtemp(prefix="rosetta-bench-"))
    root.chmod(0o755)  # the server runs as its own OS user under root
    cluster = LocalPostgresCluster(root / "pg", password="bench").start()
    try:
        yield new_streaming_env(cluster, root)
    finally:
        cluster.destroy()
        shutil.rmtree(root, ignore_errors=True)
