"""Which Debezium records may have their offsets stored: never one inside an unfinished LSN group.

Changes can share one LSN: COPY writes a page of rows as one WAL record, a TRUNCATE of several
tables is one message, an UPDATE of the primary key becomes a delete and a create. Debezium
3.6's stored offset names the LSN of the last change processed, and on restart it resumes at
the first *different* LSN (``WalPositionLocator``): an offset stored after part of such a group
skips the rest of it for good (reproduced: a stream ended after the first batch of a COPY lost
the rest of that page's rows; debezium/dbz#1554, fixed upstream after 3.6). So a record is
marked processed only once the group it ends is known complete: a later record with another
LSN, or a record at a commit or a logical message, has been applied. The held-back tail is
marked with a later batch; a stream that stops meanwhile gets it delivered again, which a
keyed apply absorbs.

Where changes are told apart from their replays (pipelines with tables without a key, see
core.streaming.redelivery), a timer heartbeat record is never marked: its offset may name a
position no record carries (past a commit), which a destination could not recognise as its own.
The heartbeat action's logical messages are records of their own and move the offset.

Pure Python: the engine gives each record's group (see :data:`ENDS_GROUPS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A record's group: the LSN of the change it carries (or, for a heartbeat taken inside a
# transaction, of the last change before it), or ENDS_GROUPS for a record stored at a commit
# or a logical message (or of the snapshot), after which every earlier group is complete.
ENDS_GROUPS = None
# A record passed over as if absent, and never marked.
NEVER_MARKED = -1
Group = int | None


def complete_prefix(groups: Sequence[Group]) -> int:
    """How many leading records of ``groups`` (in stream order) end complete groups."""
    complete = 0
    previous: Group = ENDS_GROUPS
    for index, group in enumerate(groups):
        if group == NEVER_MARKED:
            continue
        if group is ENDS_GROUPS:
            complete = index + 1
        elif index > 0 and group != previous:
            complete = max(complete, index)
        previous = group
    return complete


class OffsetMarking:
    """The records of a stream, across batches, whose offsets may be stored now; holds back
    the tail that may belong to an unfinished group.

    Only the last markable record is marked: the engine's offset writer keeps the latest
    offset per source partition (one for PostgreSQL) and the PostgreSQL task's
    ``commitRecord`` does nothing, so marking the last record of a complete prefix stores what
    marking each of them would, with one call into Java per batch instead of one per record.
    """

    def __init__(self) -> None:
        self._held: list[Any] = []
        self._held_groups: list[Group] = []

    def markable(self, records: Sequence[Any], groups: Sequence[Group]) -> Any | None:
        """After ``records`` (indexable; read only where needed) were applied: the record
        (a held one or one of these) to mark processed, if any."""
        held = len(self._held)
        pending_groups = [*self._held_groups, *groups]

        def record(index: int) -> Any:
            return self._held[index] if index < held else records[index - held]

        count = complete_prefix(pending_groups)
        last = next((index for index in range(count - 1, -1, -1)
                     if pending_groups[index] != NEVER_MARKED), None)
        marked = None if last is None else record(last)
        self._held = [record(index) for index in range(count, len(pending_groups))]
        self._held_groups = pending_groups[count:]
        return marked
