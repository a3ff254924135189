"""A batch collapsed to one net change per primary key, without losing a value the source did not
send.

An engine leaves out the value of a TOASTed column that a change did not touch (pgoutput's
``u``, Debezium's unavailable-value placeholder): "the row keeps its value". Collapsing the
changes of a key to its last one must keep that meaning exact:

* an earlier change of the same key in the batch carried the value: the net change takes it
  (an INSERT then an UPDATE of another column in one transaction);
* the change moved the row to a new key (an UPDATE of the primary key, which both engines
  deliver as a delete of the old key followed by the row at the new one): the value is the one
  the row had at its **old** key, as PostgreSQL's own subscriber applies it (it updates the old
  row in place), taken from the old key's pending change or from the destination row there;
* otherwise the destination row at the key keeps its value; when there is no such row (the
  destination lost it, or the key was deleted earlier in the batch), the value is read back from
  the source.

An :class:`Origin` says where the values still left out of a net change come from; the applier
resolves them in that order against the destination as it was when the batch's statements
started, then from the source. Pure Python: no database here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from rosetta_dagster.core.events import ChangeEvent

Key = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the left-out values of a net change come from, in order: the destination row at
    the change's own key (``keep``), the destination row at ``moved_from``, then the source."""

    keep: bool
    moved_from: Key | None = None


KEEP = Origin(True)  # the default: the destination row at the key keeps its values
_READ_BACK = Origin(False)  # nothing at the destination holds them: read from the source


class NetChanges:
    """The net change per key of one table in one batch (in the order of each key's latest
    change), and the origin of the values they leave out."""

    def __init__(self, key_of: Callable[[Mapping[str, Any]], Key],
                 is_unchanged: Callable[[Any], bool]) -> None:
        self.key_of = key_of
        self.is_unchanged = is_unchanged
        self.changes: dict[Key, ChangeEvent] = {}
        # Only for net changes that leave values out and do not simply keep the destination
        # row at their key (absent: KEEP).
        self.origins: dict[Key, Origin] = {}
        # The pending change a delete replaced (a move's old key), with its origin.
        self._before_delete: dict[Key, tuple[ChangeEvent, Origin]] = {}

    def add(self, event: ChangeEvent) -> None:
        """The next change of the table, in stream order."""
        changes = self.changes
        key = self.key_of(event.row)
        previous = changes.pop(key, None)  # re-inserted: dict order follows the latest change
        if previous is None and (event.before is None or event.op == "d"):
            changes[key] = event  # the common case: nothing to compose
            return
        changes[key] = self._compose(key, previous, event)

    def _compose(self, key: Key, previous: ChangeEvent | None, event: ChangeEvent) -> ChangeEvent:
        origins = self.origins
        if event.op == "d":
            if previous is not None and previous.op != "d":
                self._before_delete[key] = (previous, origins.get(key, KEEP))
            origins.pop(key, None)
            return event
        moved_from = None
        if event.before is not None:
            old_key = self.key_of(event.before)
            if old_key != key:
                moved_from = old_key
        base: ChangeEvent | None
        if moved_from is not None:
            self._leave(moved_from, event)
            base, base_origin = self._state_at(moved_from)
            # Where the moved row's values were: the earliest destination row they came from.
            source_key = base_origin.moved_from or (moved_from if base_origin.keep else None)
            # Never the destination row of a key deleted earlier in the batch.
            origin = Origin(previous is None, source_key)
        elif previous is None:  # an old row beside the change (replica identity FULL)
            base, origin = None, KEEP
        elif previous.op != "d":
            base, origin = previous, origins.get(key, KEEP)
        else:  # the key was deleted earlier in the batch: its destination row is not this row
            base, origin = None, _READ_BACK
        is_unchanged = self.is_unchanged
        after = event.after or {}
        left_out = [name for name, value in after.items() if is_unchanged(value)]
        if not left_out:
            origins.pop(key, None)
            return event
        values = dict(after)
        still_left_out = False
        if base is not None:
            base_row = base.row
            for name in left_out:
                value = base_row.get(name, _MISSING)
                if value is _MISSING or (value is not None and is_unchanged(value)):
                    still_left_out = True
                else:
                    values[name] = value
        else:
            still_left_out = True
        if still_left_out and origin != KEEP:
            origins[key] = origin
        else:
            origins.pop(key, None)
        # Not a plain insert any more (an insert goes straight into the table only when it
        # carries every value).
        return replace(event, op="u", after=values)

    def _leave(self, old_key: Key, event: ChangeEvent) -> None:
        """The row of ``event`` left ``old_key``: unless the same change deleted it already
        (pgoutput, and Debezium for its own message key, deliver a delete first), the old key
        goes away here (Debezium keys its events by the primary key, and an UPDATE of another
        replica identity index's columns comes as one update)."""
        pending = self.changes.get(old_key)
        if pending is not None and pending.op == "d" and pending.lsn == event.lsn:
            return
        self.add(ChangeEvent(event.table, "d", event.before, None, event.source_ts_ms, event.lsn,
                             event.xid, event.snapshot, event.commit_lsn))

    def _state_at(self, key: Key) -> tuple[ChangeEvent | None, Origin]:
        """What the row at ``key`` held just before the change in progress moved it away: its
        pending change (or the one its delete replaced), else the destination row there."""
        pending = self.changes.get(key)
        if pending is not None and pending.op != "d":
            return pending, self.origins.get(key, KEEP)
        if pending is not None and key in self._before_delete:
            return self._before_delete[key]
        return None, KEEP


class _Missing:
    __slots__ = ()


_MISSING = _Missing()
