"""A batch is applied on its own thread while the engine converts the next one.

Debezium's engine converts a batch (Kafka's JSON converter, on its worker threads) and then
hands it to the consumer, and polls again only when the consumer returns: conversion and apply
took turns, so a busy stream used neither the JVM nor the destination fully. The consumer
prepares a batch on the engine's thread (decoded and completed) and hands it here; this thread
applies it and only then marks its offset, so a stored offset never runs ahead of the
destination. At most one prepared batch waits, and the engine blocks behind it: memory stays
bounded, and batches are applied and marked in engine order.

An apply failure ends the thread; the engine is told (``on_failure``) and the batches after
it are dropped unmarked, so a restart delivers them again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from rosetta_dagster.core.capture import CaptureBatch

logger = logging.getLogger("rosetta.capture")

@dataclass(frozen=True)
class PreparedBatch:
    """An engine batch ready to apply: its changes (None: nothing to apply, e.g. heartbeats
    only), and how to mark its offset once they are committed."""

    batch: CaptureBatch | None
    mark: Callable[[], None]


class ApplyThread:
    """Applies prepared batches in order, then marks each one's offset. Nothing polls: an
    idle stream's apply thread sleeps until a batch comes (one per pipeline on a busy host)."""

    def __init__(self, apply: Callable[[CaptureBatch], object],
                 on_failure: Callable[[BaseException], None], *, name: str,
                 on_exit: Callable[[], None] = lambda: None) -> None:
        self._apply = apply
        self._on_failure = on_failure
        self._on_exit = on_exit
        # One condition guards the state below; every change of it is notified.
        self._changed = threading.Condition()
        self._waiting: PreparedBatch | None = None
        self._in_hand = False
        self._stopped = False  # failed, or stop(): nothing more is applied
        self._closing = False  # drain(): nothing more is taken
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Batches handed over and not yet taken up (0 or 1)."""
        return 0 if self._waiting is None else 1

    def apply_here_or_put(self, prepared: PreparedBatch, *, small: bool) -> bool:
        """A small batch, while nothing is waiting or in hand, is applied and marked on the
        caller's thread: the single-row transactions of a quiet stream, or of twenty streams
        on one host, pay no hand-over between threads (it raised their lag at 20 x 5, see
        docs/benchmarks.md); the order stays, as only the caller hands batches over. Anything
        else is put. A failure of an apply here is raised to the caller."""
        with self._changed:
            here = small and not (self._waiting is not None or self._in_hand or self._stopped
                                  or self._closing)
        if here:
            self._apply_and_mark(prepared)
            return True
        return self.put(prepared)

    def put(self, prepared: PreparedBatch) -> bool:
        """Hand a batch over; blocks while another one waits. False once this thread has
        failed, stopped or is draining: the batch is dropped unmarked."""
        with self._changed:
            self._changed.wait_for(lambda: self._waiting is None or self._stopped
                                   or self._closing)
            if self._stopped or self._closing:
                return False
            self._waiting = prepared
            self._changed.notify_all()
            return True

    def drain(self, timeout_s: float) -> bool:
        """Before the engine closes: wait until every handed-over batch is applied and marked
        (so the engine's last offset flush stores them); batches handed over later are
        dropped unmarked. False when that took longer than ``timeout_s``."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
            return self._changed.wait_for(
                lambda: self._stopped or (self._waiting is None and not self._in_hand),
                timeout_s)

    def stop(self) -> None:
        """After the engine's last batch: the batch in hand is finished, a waiting one is
        dropped unmarked (delivered again on the next start)."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self._thread.join()

    def _take(self) -> PreparedBatch | None:
        with self._changed:
            self._changed.wait_for(lambda: self._waiting is not None or self._stopped)
            if self._stopped:
                return None
            prepared, self._waiting = self._waiting, None
            self._in_hand = True
            self._changed.notify_all()
            return prepared

    def _run(self) -> None:
        try:
            while (prepared := self._take()) is not None:
                try:
                    self._apply_and_mark(prepared)
                finally:
                    with self._changed:
                        self._in_hand = False
                        self._changed.notify_all()
        except Exception as exc:  # noqa: BLE001 - reported through on_failure
            self.error = exc
            with self._changed:
                self._stopped = True
                self._changed.notify_all()
            self._on_failure(exc)
        finally:
            self._on_exit()

    def _apply_and_mark(self, prepared: PreparedBatch) -> None:
        if prepared.batch is not None:
            self._apply(prepared.batch)
        try:
            prepared.mark()
        except Exception as exc:  # noqa: BLE001 - only a closing engine refuses a mark
            if not self._closing:
                raise
            # Applied, but the engine closed before storing its offset: the next start
            # delivers the batch again, and applying it again changes nothing.
            logger.info("A batch applied while the engine closed is delivered again on the "
                        "next start (%s)", type(exc).__name__)
