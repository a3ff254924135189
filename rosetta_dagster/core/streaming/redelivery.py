"""Changes an engine delivers again after a restart, told apart from new ones per destination.

Debezium stores its offset apart from the destinations, after a batch is applied everywhere
(and only at the end of a complete group of records, see capture.debezium.marking). A restart
therefore delivers again what came after the stored offset, some of which the destinations
already committed. A keyed row absorbs that (the same upsert again), but a row of a table
without a key would be added or removed twice. So, in pipelines with such tables:

* each record carries its :class:`~rosetta_dagster.core.events.Delivery` (the identity of its
  offset and its ordinal among records of that identity), the same when delivered again;
* each destination records, in the transaction of each batch, the delivery of the last record
  it took (changes, watermarks and logical messages alike, so that it is never behind the
  stored offset: the engine marks records only after every destination took them, and never
  marks a timer heartbeat, whose offset no record carries);
* on a start, a destination whose recorded delivery is not the stored offset's record is
  ahead of it: the engine delivers that record again, and until it has passed, this
  destination skips the changes of tables without a key (it has them). A recorded delivery
  that *is* the stored offset's record means nothing is delivered again.

Recorded deliveries are forgotten when the stream starts afresh (a new load and slot).
Pure Python: the destinations read and record the delivery (``DestinationWriter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rosetta_dagster.core.events import ChangeEvent, Delivery
from rosetta_dagster.core.pipeline_config import TableRef


class Redelivery:
    """One destination's view of a restarted stream: which changes of tables without a key
    it already has."""

    def __init__(self, recorded: Delivery | None, resumes_after: str | None,
                 keyless: Callable[[TableRef], bool]) -> None:
        # The last record this destination took, while the engine has not delivered it again.
        self.awaiting = (recorded if recorded is not None and recorded.record != resumes_after
                         else None)
        self._keyless = keyless
        self._taken: set[Delivery] | None = None  # of the current batch: what it already has

    def begin_batch(self, deliveries: Sequence[Delivery]) -> None:
        """A batch's records in stream order: those up to the awaited one are taken."""
        awaiting = self.awaiting
        if awaiting is None:
            self._taken = None
            return
        try:
            through = deliveries.index(awaiting)
        except ValueError:
            self._taken = set(deliveries)  # the whole batch comes before it
            return
        self._taken = set(deliveries[:through + 1])
        self.awaiting = None

    def untaken(self, events: Sequence[ChangeEvent]) -> Sequence[ChangeEvent]:
        """``events`` of the current batch without the changes of tables without a key this
        destination already has."""
        taken = self._taken
        if not taken:
            return events
        return [e for e in events
                if e.delivery is None or e.delivery not in taken or not self._keyless(e.table)]
