"""The Debezium engine's apply thread (core.capture.debezium.apply_thread): batches are applied
in engine order while the next one is prepared, each offset is marked only after its batch is
applied, a failure stops everything after it, and a drain finishes what was handed over. The
same thread under the real engine: test_capture_contract."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from rosetta_dagster.core.capture import CaptureBatch
from rosetta_dagster.core.capture.debezium.apply_thread import ApplyThread, PreparedBatch
from rosetta_dagster.harness import wait_until


class _Recorder:
    """Applies by recording; a batch named in ``hold`` waits for ``release``, one named in
    ``refuse`` raises."""

    def __init__(self, hold: str = "", refuse: str = "", refuse_mark: str = "") -> None:
        self.log: list[str] = []
        self.hold, self.refuse, self.refuse_mark = hold, refuse, refuse_mark
        self.holding, self.release = threading.Event(), threading.Event()
        self.failures: list[BaseException] = []

    def apply(self, batch: CaptureBatch) -> None:
        name = str(batch.items[0])
        self.log.append(f"apply {name}")
        if name == self.hold:
            self.holding.set()
            assert self.release.wait(30)
        if name == self.refuse:
            raise ValueError(f"refused {name}")

    def batch(self, name: str) -> PreparedBatch:
        def mark() -> None:
            if name == self.refuse_mark:
                raise RuntimeError("the engine is closed")
            self.log.append(f"mark {name}")
        return PreparedBatch(CaptureBatch([name]), mark)  # type: ignore[list-item]

    def thread(self) -> ApplyThread:
        return ApplyThread(self.apply, self.failures.append, name="test-apply")


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    return thread, result


def test_batches_are_applied_in_order_each_marked_after_its_apply_one_waiting_at_most() -> None:
    recorder = _Recorder(hold="b1")
    applier = recorder.thread()
    try:
        assert applier.put(recorder.batch("b1"))
        assert recorder.holding.wait(10)
        # While b1 is applied the engine hands over b2 and goes on; b3 waits behind it.
        assert applier.put(recorder.batch("b2"))
        assert applier.waiting == 1
        third, returned = _in_thread(lambda: applier.put(recorder.batch("b3")))
        third.join(0.3)
        assert third.is_alive() and recorder.log == ["apply b1"]
        recorder.release.set()
        third.join(10)
        assert returned == [True]
        wait_until(lambda: len(recorder.log) == 6, 10, "the three batches")
        assert recorder.log == ["apply b1", "mark b1", "apply b2", "mark b2", "apply b3",
                                "mark b3"]
        assert applier.error is None and recorder.failures == []
    finally:
        recorder.release.set()
        applier.stop()


def test_an_apply_failure_is_reported_and_nothing_after_it_is_applied_or_marked() -> None:
    recorder = _Recorder(hold="b2", refuse="b2")
    applier = recorder.thread()
    try:
        assert applier.put(recorder.batch("b1"))
        assert applier.put(recorder.batch("b2"))
        assert recorder.holding.wait(10)
        assert applier.put(recorder.batch("b3"))  # handed over before b2 failed
        recorder.release.set()
        wait_until(lambda: recorder.failures, 10, "the failure")
        assert [str(exc) for exc in recorder.failures] == ["refused b2"]
        assert applier.error is recorder.failures[0]
        assert not applier.put(recorder.batch("b4"))
        applier.stop()
        assert recorder.log == ["apply b1", "mark b1", "apply b2"]
    finally:
        recorder.release.set()
        applier.stop()


@pytest.mark.parametrize("mark_refused", [False, True])
def test_a_drain_finishes_what_was_handed_over_and_refuses_what_comes_after(
        mark_refused: bool) -> None:
    """Before the engine closes, the batch in hand and the waiting one are applied and marked;
    a closing engine refusing a mark is not a failure (the batch is delivered again)."""
    recorder = _Recorder(hold="b1", refuse_mark="b2" if mark_refused else "")
    applier = recorder.thread()
    try:
        assert applier.put(recorder.batch("b1"))
        assert applier.put(recorder.batch("b2"))
        assert recorder.holding.wait(10)
        drain, drained = _in_thread(lambda: applier.drain(30))
        drain.join(0.3)
        assert drain.is_alive()
        recorder.release.set()
        drain.join(10)
        assert drained == [True]
        assert not applier.put(recorder.batch("b3"))
        assert recorder.log == ["apply b1", "mark b1", "apply b2"] + (
            [] if mark_refused else ["mark b2"])
        assert applier.error is None and recorder.failures == []
    finally:
        recorder.release.set()
        applier.stop()


def test_a_small_batch_is_applied_on_the_callers_thread_only_while_the_thread_is_idle() -> None:
    """No hand-over for the single-row transactions of a quiet stream; behind a batch in hand
    a small one waits its turn, so the order stays."""
    recorder = _Recorder(hold="b2")
    applied_on: list[str] = []
    apply = recorder.apply

    def where(batch: CaptureBatch) -> None:
        applied_on.append(threading.current_thread().name)
        apply(batch)

    recorder.apply = where  # type: ignore[method-assign]
    applier = recorder.thread()
    try:
        assert applier.apply_here_or_put(recorder.batch("b1"), small=True)
        assert applier.apply_here_or_put(recorder.batch("b2"), small=False)
        assert recorder.holding.wait(10)
        third, returned = _in_thread(lambda: applier.apply_here_or_put(
            recorder.batch("b3"), small=True))
        third.join(10)
        assert returned == [True] and applier.waiting == 1
        recorder.release.set()
        wait_until(lambda: len(recorder.log) == 6, 10, "the three batches")
        assert recorder.log == ["apply b1", "mark b1", "apply b2", "mark b2", "apply b3",
                                "mark b3"]
        caller = threading.current_thread().name
        assert applied_on == [caller, "test-apply", "test-apply"]
    finally:
        recorder.release.set()
        applier.stop()
