"""A stream ended by a signal is told so twice: by the exception the signal's handler raises in
the waiting thread, and by an event the stream's loop checks every second.

The exception alone can be lost. Raised while a C module imports another and clears whatever
error occurred meanwhile, it never reaches the stream, which runs on: JPype's module imports
numpy that way, and a SIGTERM landing in that import (a Debezium stream reading its offsets
while it starts) left ``rosetta stream`` running (reproduced 6 times in 30 starts signalled
0.12-0.32 s in; a second SIGTERM stopped each).

A process that streamed with Debezium, or was signalled while it started, ends with
:func:`exit_now`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def termination_event() -> Iterator[threading.Event]:
    """While the block runs, SIGINT and SIGTERM also set the event yielded, then do what they
    did before (the handler before runs; a default one raises KeyboardInterrupt, so that the
    stream closes its engine; an ignored signal stays ignored). Outside the main thread (where
    handlers cannot be set) the event is only set by the caller."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {number: signal.getsignal(number) for number in _SIGNALS}

    def handler(number: int, frame: FrameType | None) -> None:
        before = previous[number]
        if before == signal.SIG_IGN:
            return
        event.set()
        if callable(before):
            before(number, frame)  # Python's SIGINT and Dagster's raise; the event stays
            return
        raise KeyboardInterrupt

    for number in _SIGNALS:
        signal.signal(number, handler)
    try:
        yield event
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


def exit_now(code: int) -> None:
    """End the process with ``code`` at once, without the interpreter's teardown; everything
    must be closed and flushed (logging and standard streams are flushed here).

    Two teardowns went wrong. The JVM is never destroyed (see ``ensure_jvm``), so a normal exit
    tears the process down (interpreter finalization, the C library's exit handlers) around
    Java threads that still run: rarely, one crashes in it and the JVM aborts the process
    (SIGABRT), after the engine was closed and every offset stored. And a signal's
    KeyboardInterrupt raised inside code a C module runs while it is imported (JPype's, numpy's)
    marks the interpreter as ended by Ctrl-C even when the exception is handled: a stream
    stopped cleanly, printed so, and exited with -2 (SIGINT) in 4 of 7 runs of the test.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
