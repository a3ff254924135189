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
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from rosetta_dagster.core.capture import CaptureBatch

logger = logging.getLogger("rosetta.capture")

_WAKE_S = 0.1  # how often a blocked put or get looks at the stop flag


@dataclass(frozen=True)
class PreparedBatch:
    """An engine batch ready to apply: its changes (None: nothing to apply, e.g. heartbeats
    only), and how to mark its offset once they are committed."""

    batch: CaptureBatch | None
    mark: Callable[[], None]


class ApplyThread:
    """Applies prepared batches in order, then marks each one's offset."""

    def __init__(self, apply: Callable[[CaptureBatch], object],
                 on_failure: Callable[[BaseException], None], *, name: str,
                 on_exit: Callable[[], None] = lambda: None) -> None:
        self._apply = apply
        self._on_failure = on_failure
        self._on_exit = on_exit
        self._waiting: queue.Queue[PreparedBatch] = queue.Queue(maxsize=1)
        self._stopped = threading.Event()
        self._closing = False
        # Batches handed over and not yet applied and marked (the waiting one, the one in
        # hand); told to drain() by the condition.
        self._unfinished = 0
        self._finished = threading.Condition()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Batches handed over and not yet taken up (0 or 1)."""
        return self._waiting.qsize()

    def put(self, prepared: PreparedBatch) -> bool:
        """Hand a batch over; blocks while another one waits. False once this thread has
        failed, stopped or is draining: the batch is dropped unmarked."""
        with self._finished:
            self._unfinished += 1
        while not self._stopped.is_set() and not self._closing:
            try:
                self._waiting.put(prepared, timeout=_WAKE_S)
                return True
            except queue.Full:
                continue
        self._finish_one()
        return False

    def drain(self, timeout_s: float) -> bool:
        """Before the engine closes: wait until every handed-over batch is applied and marked
        (so the engine's last offset flush stores them); batches handed over later are
        dropped unmarked. False when that took longer than ``timeout_s``."""
        self._closing = True
        with self._finished:
            return self._finished.wait_for(
                lambda: self._unfinished == 0 or self._stopped.is_set(), timeout_s)

    def stop(self) -> None:
        """After the engine's last batch: the batch in hand is finished, a waiting one is
        dropped unmarked (delivered again on the next start)."""
        self._stopped.set()
        self._thread.join()

    def _finish_one(self) -> None:
        with self._finished:
            self._unfinished -= 1
            self._finished.notify_all()

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                try:
                    prepared = self._waiting.get(timeout=_WAKE_S)
                except queue.Empty:
                    continue
                try:
                    self._apply_and_mark(prepared)
                finally:
                    self._finish_one()
        except Exception as exc:  # noqa: BLE001 - reported through on_failure
            self.error = exc
            self._stopped.set()
            self._on_failure(exc)
        finally:
            with self._finished:
                self._finished.notify_all()
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
