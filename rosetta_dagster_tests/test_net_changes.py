"""Collapsing a batch to one net change per key without losing values it left out, and a
keyless table's batch to a net count per row (no database)."""

from __future__ import annotations

from typing import Any

import pytest

from rosetta_dagster.core.destination.keyless_changes import KeylessChangeError, KeylessChanges
from rosetta_dagster.core.destination.net_changes import KEEP, NetChanges, Origin
from rosetta_dagster.core.events import UNCHANGED_TOAST, ChangeEvent
from rosetta_dagster.core.pipeline_config import TableRef

T = TableRef("public", "w")
U = UNCHANGED_TOAST


def _net() -> NetChanges:
    return NetChanges(lambda row: (row.get("id"),), lambda value: value is U)


def _row(id_: int, note: Any = "n", big: Any = U) -> dict[str, Any]:
    return {"id": id_, "note": note, "big": big}


def insert(id_: int, big: Any = "B") -> ChangeEvent:
    return ChangeEvent(T, "c", None, _row(id_, big=big))


def update(id_: int, note: str = "x", big: Any = U, moved_from: int | None = None) -> ChangeEvent:
    before = {"id": moved_from} if moved_from is not None else None
    return ChangeEvent(T, "u", before, _row(id_, note, big))


def delete(id_: int) -> ChangeEvent:
    return ChangeEvent(T, "d", {"id": id_}, None)


def move(old: int, new: int, note: str = "n") -> list[ChangeEvent]:
    """An UPDATE of the key as both engines deliver it."""
    return [delete(old), update(new, note, moved_from=old)]


def collapse(*events: ChangeEvent | list[ChangeEvent]) -> NetChanges:
    net = _net()
    for item in events:
        for event in item if isinstance(item, list) else [item]:
            net.add(event)
    return net


def test_plain_changes_pass_through_and_the_last_one_wins() -> None:
    first, last = update(1, "a"), update(1, "b", big="C")
    net = collapse(insert(2), first, last)
    assert net.changes[(1,)] is last and net.origins == {}
    assert list(net.changes) == [(2,), (1,)]  # in the order of each key's latest change


def test_a_value_left_out_after_an_insert_in_the_batch_is_the_inserted_one() -> None:
    net = collapse(insert(1, big="B"), update(1, "y"))
    assert net.changes[(1,)].after == _row(1, "y", "B") and net.origins == {}


def test_an_update_left_out_keeps_the_destination_row() -> None:
    net = collapse(update(1, "y"))
    assert net.changes[(1,)].after == _row(1, "y", U) and net.origins == {}  # KEEP


def test_a_moved_row_takes_left_out_values_from_its_old_key() -> None:
    net = collapse(move(1, 101))
    assert net.changes[(1,)].op == "d"
    assert net.changes[(101,)].after == _row(101, "n", U)
    assert net.origins == {(101,): Origin(True, (1,))}


def test_a_moved_row_takes_a_value_its_old_key_received_in_the_batch() -> None:
    net = collapse(update(1, "a", big="NEW"), move(1, 101), update(101, "b"))
    assert net.changes[(101,)].after == _row(101, "b", "NEW") and net.origins == {}


def test_a_row_moved_twice_keeps_its_first_key_as_origin() -> None:
    net = collapse(move(1, 2), move(2, 3), update(3, "z"))
    assert net.origins == {(3,): Origin(True, (1,))}
    assert net.changes[(2,)].op == "d" and net.changes[(1,)].op == "d"


def test_a_key_freed_in_the_batch_never_lends_its_old_row() -> None:
    # 5 -> 0, 6 -> 5, 0 -> 6: two rows swap keys through a free one
    net = collapse(move(5, 0), move(6, 5), move(0, 6))
    assert net.origins == {(5,): Origin(False, (6,)), (6,): Origin(False, (5,))}
    assert net.changes[(0,)].op == "d"


def test_an_update_after_a_delete_of_the_key_is_read_back() -> None:
    net = collapse(delete(1), insert(1, big=U), update(1))
    assert net.origins == {(1,): Origin(False)}


def test_a_row_moved_onto_a_key_reused_later_keeps_its_values() -> None:
    net = collapse(move(4, 104), move(104, 105), insert(4, big="NEW4"))
    assert net.origins == {(105,): Origin(True, (4,))}
    assert net.changes[(4,)].after == _row(4, big="NEW4")


def test_keep_is_the_default_origin() -> None:
    assert Origin(True) == KEEP


def test_a_row_that_leaves_its_key_in_one_update_frees_the_old_key() -> None:
    # Debezium keys its events by the primary key: an UPDATE of another replica identity
    # index's columns comes as one update whose old row has the old key.
    lone = ChangeEvent(T, "u", {"id": 1}, _row(101, "n", U), lsn=7)
    net = collapse(lone)
    assert net.changes[(1,)].op == "d"
    assert net.origins == {(101,): Origin(True, (1,))}


# -- tables without a key: a net count per row ---------------------------------------------

def _keyless() -> KeylessChanges:
    return KeylessChanges(lambda row: "\t".join(str(row.get(c)) for c in ("n", "big")),
                          lambda value: value is U, "public.w")


def _counts(*events: ChangeEvent) -> dict[str, int]:
    changes = _keyless()
    for event in events:
        changes.add(event)
    return changes.counts


def _full(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
          lsn: int = 1) -> ChangeEvent:
    return ChangeEvent(T, op, before, after, lsn=lsn)


def test_a_keyless_batch_counts_each_row_added_and_removed() -> None:
    a, b = {"n": 1, "big": "x"}, {"n": 2, "big": "x"}
    counts = _counts(_full("c", None, a, 1), _full("c", None, a, 2),  # a duplicate
                     _full("u", a, b, 3),  # one of the two changes
                     _full("d", {"n": 9, "big": None}, None, 4))
    assert counts == {"1\tx": 1, "2\tx": 1, "9\tNone": -1}
    # Added and removed in the batch: nothing left to do.
    assert _counts(_full("c", None, a, 1), _full("d", a, None, 2)) == {}


def test_pgoutputs_delete_and_new_row_of_one_update_remove_the_old_row_once() -> None:
    a, b = {"n": 1, "big": "x"}, {"n": 2, "big": "x"}
    assert _counts(_full("d", a, None, 5), _full("u", a, b, 5)) == {"1\tx": -1, "2\tx": 1}
    # Two changes: a delete, then another row updated from an equal old row.
    assert _counts(_full("d", a, None, 5), _full("u", a, b, 6)) == {"1\tx": -2, "2\tx": 1}


def test_a_keyless_update_takes_left_out_values_from_its_old_row() -> None:
    old, new = {"n": 1, "big": "B"}, {"n": 2, "big": U}
    assert _counts(_full("u", old, new)) == {"1\tB": -1, "2\tB": 1}
    with pytest.raises(KeylessChangeError, match="left column big out"):
        _counts(_full("u", {"n": 1, "big": U}, new))
    with pytest.raises(KeylessChangeError, match="came without its old row"):
        _counts(_full("d", None, None))
