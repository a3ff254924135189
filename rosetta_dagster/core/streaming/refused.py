"""Applying a batch when a destination may refuse some of it.

Transient errors are retried, same batch, with backoff, for ``apply_retry_seconds``. A data
error is isolated: in one destination transaction that is rolled back afterwards, halves of
the batch are tried under a savepoint (in stream order) until the one refused change is known
(``DestinationWriter.first_refused``); then the rest is applied with the batch's position in
one transaction, so a crash never replays something applied. Then the pipeline's
``on_apply_error`` policy:

- ``stop``: the report (source table, key, operation, position, time, destination, column,
  PostgreSQL's message) is recorded, the pipeline is set to PAUSE so nothing restarts it, and
  the run fails with that sentence. What came before is applied and the position moves to the
  change's source transaction, never past it, so the next start replays that transaction;
  ``rosetta pipeline skip`` drops exactly that change once a person confirmed.
- ``park``: the change is stored whole in the config store and the stream goes on. Later
  changes of the same key (same destination) are parked behind it, so an older value can never
  overwrite a newer one. ``rosetta parked retry`` asks the stream to replay a key's changes in
  order (before anything newer) and release the key; ``discard`` drops them.

A source transaction larger than one batch (pgoutput pieces) is applied as one destination
transaction; a refusal inside it cannot be split off and stops the run with the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rosetta_dagster.core.config_store import ApplySkip, ConfigStore, ParkedRow, PipelineStatus
from rosetta_dagster.core.destination import BatchResult, DestinationWriter
from rosetta_dagster.core.destination.errors import (
    OPERATIONS,
    RefusedChange,
    classify,
    error_parts,
    event_from_text,
    event_position,
)
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import PipelineDefinition
from rosetta_dagster.core.replication import Log

logger = logging.getLogger("rosetta.apply")

_T = TypeVar("_T")

MAX_RETRY_DELAY_S = 30.0
PARKED_POLL_S = 1.0


class StoppedOnRefusedChange(RosettaError):  # noqa: N818 - an outcome the user acts on
    """on_apply_error: stop — the pipeline stopped on a change a destination refused."""

    def __init__(self, report: RefusedChange) -> None:
        super().__init__(report.sentence() + " The pipeline is paused: fix the destination and "
                         "run `rosetta pipeline start " + report.pipeline + "`, or skip this "
                         "change with `rosetta pipeline skip " + report.pipeline +
                         f" --position {report.position}`.")
        self.report = report


def _key_id(table: str, key: dict[str, Any]) -> tuple[str, str]:
    return table, json.dumps(key, sort_keys=True)


class RefusedChanges:
    """Retry, isolation, stop/park and skips for one streaming session's destinations."""

    def __init__(self, pipeline: PipelineDefinition, store: ConfigStore | None, log: Log,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.pipeline = pipeline
        self.store = store
        self.log = log
        self.sleep = sleep
        settings = pipeline.settings
        self.park = settings.on_apply_error == "park" and store is not None
        self.retry_s = settings.apply_retry_seconds
        # destination -> keys with parked changes: (table, key JSON)
        self._parked: dict[str, set[tuple[str, str]]] = {}
        self._skips: list[ApplySkip] = []
        self._next_poll = 0.0
        self.stopped_on: RefusedChange | None = None  # the change the last run stopped on
        # The current batch's records, when the engine delivers again (see
        # core.streaming.redelivery): a stop records the one before the refused change.
        self.deliveries: Sequence[Delivery] = ()

    def load(self) -> None:
        """What the config store says before streaming: skips, parked keys, the last stop."""
        if self.store is None:
            return
        self._skips = self.store.pending_skips(self.pipeline.name)
        self.stopped_on = self.store.get_pipeline(self.pipeline.name).last_apply_error
        self._refresh_parked()

    # -- applying --------------------------------------------------------------------------

    def apply(self, writer: DestinationWriter, events: Sequence[ChangeEvent], *,
              record_keys: bool, position: int | None, complete: bool,
              unreachable_handled: bool, delivered: Delivery | None = None) -> BatchResult:
        """Apply a batch to one destination, whatever it refuses (see the module docstring).

        ``unreachable_handled``: the caller takes a lost destination out of rotation, so a
        lost connection is raised at once instead of retried here.
        """
        if self._skips:
            events = self._drop_skipped(writer, events)
        if self._parked.get(writer.name):
            events = self._park_behind(writer, events)
        spanning = writer.in_transaction  # earlier pieces are in the open transaction
        try:
            return self._retrying(writer, lambda: writer.apply(
                events, record_keys=record_keys, position=position, complete=complete,
                delivered=delivered), spanning or unreachable_handled)
        except Exception as exc:  # noqa: BLE001 - classified just below
            data = classify(exc) == "data"
            if not data or spanning or not complete or record_keys:
                if data and events:
                    self._note_unsplittable(writer, events, exc)
                raise
            return self._isolate(writer, list(events), position, delivered)

    def _retrying(self, writer: DestinationWriter, attempt: Callable[[], _T],
                  raise_at_once: bool) -> _T:
        deadline: float | None = None
        tries = 0
        while True:
            try:
                return attempt()
            except Exception as exc:
                if classify(exc) != "transient" or raise_at_once:
                    raise
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.retry_s
                if now >= deadline:
                    raise
                tries += 1
                delay = min(0.5 * 2 ** (tries - 1), MAX_RETRY_DELAY_S, deadline - now)
                sqlstate, _, reason = error_parts(exc)
                self.log.warning(
                    "Pipeline %s: destination %s: transient error%s: %s; retrying the same "
                    "batch in %.1f s (attempt %d, giving up %.0f s after the first error)",
                    self.pipeline.name, writer.name, f" [SQLSTATE {sqlstate}]" if sqlstate else "",
                    reason, delay, tries + 1, self.retry_s)
                self.sleep(delay)

    def _isolate(self, writer: DestinationWriter, events: list[ChangeEvent],
                 position: int | None, delivered: Delivery | None) -> BatchResult:
        """Find the refused changes in a transaction that is rolled back, then apply the rest
        and the batch's position in one transaction: a crash in between replays nothing that
        was applied (a row without a key would be added twice)."""
        kept: list[ChangeEvent] = []
        remaining = events
        while remaining:
            found = self._retrying(
                writer, lambda done=kept, todo=remaining: writer.first_refused(done, todo), False)
            if found is None:
                kept.extend(remaining)
                break
            index, exc = found
            event = remaining[index]
            report = RefusedChange.of(self.pipeline.name, writer.name, event,
                                      writer.key_text(event), exc)
            kept.extend(remaining[:index])
            if not self.park:
                self._apply_before(writer, kept, event)
                self._stop(report)
            self.log.error("%s Parked with the key's later changes (on_apply_error: park).",
                           report.sentence())
            self._park(writer, [event], report)
            remaining = self._park_behind(writer, remaining[index + 1:])
        return self._retrying(writer, lambda: writer.apply(kept, position=position,
                                                           delivered=delivered), False)

    def _apply_before(self, writer: DestinationWriter, before: list[ChangeEvent],
                      refused: ChangeEvent) -> None:
        """Before stopping: what came before the refused change is applied, and the position
        moves to the start of its transaction (its commit), which the next start replays
        whole. That transaction's earlier changes to tables without a key wait for the replay:
        applied now they would be there twice."""
        transaction = refused.commit_lsn
        kept = [e for e in before
                if transaction is None or e.commit_lsn != transaction or writer.has_key(e.table)]
        self._retrying(writer, lambda: writer.apply(
            kept, position=transaction, delivered=self._delivered_before(refused)), False)

    def _delivered_before(self, refused: ChangeEvent) -> Delivery | None:
        """The record before ``refused`` in the batch: the next start delivers ``refused``
        again, and what came before it is taken. None: it is the batch's first record."""
        if refused.delivery is None or refused.delivery not in self.deliveries:
            return None
        index = self.deliveries.index(refused.delivery)
        return self.deliveries[index - 1] if index > 0 else None

    def _stop(self, report: RefusedChange) -> None:
        if self.store is not None:
            self.store.record_apply_error(self.pipeline.name, report)
            self.store.set_pipeline_status(self.pipeline.name, PipelineStatus.PAUSE)
        raise StoppedOnRefusedChange(report)

    def _note_unsplittable(self, writer: DestinationWriter, events: Sequence[ChangeEvent],
                           exc: BaseException) -> None:
        """A refusal inside one source transaction applied in pieces: recorded, not split."""
        if self.store is None:
            return
        report = RefusedChange.of(self.pipeline.name, writer.name, events[0],
                                  writer.key_text(events[0]), exc)
        self.store.record_apply_error(self.pipeline.name, report)

    # -- skips -----------------------------------------------------------------------------

    def _drop_skipped(self, writer: DestinationWriter, events: Sequence[ChangeEvent]
                      ) -> list[ChangeEvent]:
        kept = []
        for event in events:
            skip = self._matching_skip(writer, event)
            if skip is None:
                kept.append(event)
                continue
            self._skips.remove(skip)
            assert self.store is not None
            self.store.mark_skipped(skip.id)
            self.log.warning(
                "Pipeline %s: skipped the %s of %s key %s at source position %s on destination "
                "%s, as %s asked at %s", self.pipeline.name, skip.operation, skip.table_name,
                json.dumps(skip.key), skip.position, writer.name, skip.requested_by,
                skip.requested_at.isoformat(timespec="seconds"))
        return kept

    def _matching_skip(self, writer: DestinationWriter, event: ChangeEvent) -> ApplySkip | None:
        position = event_position(event)
        if position is None:
            return None
        for skip in self._skips:
            if (skip.destination == writer.name and skip.position == position
                    and skip.table_name == event.table.qualified
                    and skip.key == writer.key_text(event)):
                return skip
        return None

    # -- parking ---------------------------------------------------------------------------

    def _park_behind(self, writer: DestinationWriter, events: Sequence[ChangeEvent]
                     ) -> list[ChangeEvent]:
        """Changes of keys with parked changes go behind them; the rest is returned."""
        parked = self._parked.get(writer.name)
        if not parked:
            return list(events)
        kept: list[ChangeEvent] = []
        behind: list[ChangeEvent] = []
        for event in events:
            if event.carries_row and _key_id(event.table.qualified, writer.key_text(event)) in parked:
                behind.append(event)
            else:
                kept.append(event)
        if behind:
            self._park(writer, behind, None)
        return kept

    def _park(self, writer: DestinationWriter, events: Sequence[ChangeEvent],
              report: RefusedChange | None) -> None:
        assert self.store is not None
        rows = []
        for event in events:
            key = writer.key_text(event)
            error = report.sentence() if report is not None else (
                "parked behind an earlier refused change of the same key")
            rows.append(ParkedRow(writer.name, event.table.qualified, key,
                                  OPERATIONS.get(event.op, event.op), event_position(event),
                                  writer.event_as_text(event), error,
                                  report.sqlstate if report is not None else None))
            self._parked.setdefault(writer.name, set()).add(
                _key_id(event.table.qualified, key))
        self.store.park_events(self.pipeline.name, rows)

    def _refresh_parked(self) -> None:
        assert self.store is not None
        parked: dict[str, set[tuple[str, str]]] = {}
        for destination, table, key in self.store.parked_keys(self.pipeline.name):
            parked.setdefault(destination, set()).add(_key_id(table, key))
        self._parked = parked

    def replay_requested(self, writers: Sequence[DestinationWriter]) -> None:
        """Replay the parked changes a person asked to retry, key by key, oldest first, and
        release the keys that went through. Called by the stream between batches."""
        if self.store is None or not self.park and not self._parked:
            return
        if any(a.in_transaction for a in writers):
            return  # inside a large source transaction: replay after its commit
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + PARKED_POLL_S
        requested = self.store.list_parked(self.pipeline.name, retry_requested=True)
        by_name = {a.name: a for a in writers}
        groups: dict[tuple[str, str, str], list[Any]] = {}
        for row in requested:
            groups.setdefault((row.destination, *_key_id(row.table_name, row.key)), []).append(row)
        for (destination, table, key), rows in groups.items():
            writer = by_name.get(destination)
            if writer is None:
                continue
            # Positions are the key's past: replayed without them (a destination tracking its
            # position would otherwise take them for changes it already has).
            events = [event_from_text({**r.event, "commit_lsn": None}) for r in rows]
            ids = [r.id for r in rows]
            try:
                self._retrying(writer, lambda a=writer, e=events: a.apply(e), False)
            except Exception as exc:
                if classify(exc) != "data":
                    raise
                sqlstate, _, reason = error_parts(exc)
                self.store.parked_retry_failed(ids, reason, sqlstate)
                self.log.error("Pipeline %s: replaying %d parked change(s) of %s key %s on "
                               "destination %s failed again: %s", self.pipeline.name, len(ids),
                               table, key, destination, reason)
                continue
            self.store.release_parked(ids)
            self.log.info("Pipeline %s: replayed %d parked change(s) of %s key %s on destination "
                          "%s; the key streams again", self.pipeline.name, len(ids), table, key,
                          destination)
        self._refresh_parked()
