"""Random change sequences for the warehouse destinations' tests: transactions of inserts,
updates that leave TOASTed values untouched, key updates, deletes, TRUNCATEs and added columns
with hostile values on ``public.seq`` (keyed), and changes of duplicate rows of
``public.seqlog`` (no key)."""

from __future__ import annotations

import random

SEQUENCE_TABLE = ("CREATE TABLE public.seq (id int PRIMARY KEY, n int, doc text, blob bytea, "
                  "amount numeric, at timestamptz); ALTER TABLE public.seq ALTER doc SET STORAGE "
                  "EXTERNAL, ALTER blob SET STORAGE EXTERNAL")
_HOSTILE_TEXT = ("", "it's \"q\" \\ back", "tab\tnl\n", "🐘 ü", None)
_AMOUNTS = ("NaN", "-0.000", "123456789012345678901234567890.5", "Infinity", None)
_TIMES = ("infinity", "-infinity", "0044-03-15 12:00:00+00 BC", "2024-02-29 23:59:59.999999+05:45",
          None)


SEQUENCE_LOG = ("CREATE TABLE public.seqlog (at int, msg text, doc json); "
                "ALTER TABLE public.seqlog REPLICA IDENTITY FULL")
# Columns a sequence may add (name, type, default): native and kept-as-text families.
_ADDED = (("extra_i", "int", "7"), ("extra_t", "text", "'it''s'"), ("extra_n", "numeric", None))


def _log_change(rnd: random.Random) -> tuple[str, tuple[object, ...]]:
    """One random change of public.seqlog (no key: duplicates are the point)."""
    kind = rnd.choice(("insert", "insert", "delete_one", "update_one"))
    at, msg = rnd.randint(1, 3), rnd.choice(("a", "", None))
    if kind == "insert":
        return ("INSERT INTO public.seqlog SELECT %s, %s, %s::json FROM generate_series(1, %s)",
                (at, msg, rnd.choice(('{"k": 1}', "[]", None)), rnd.randint(1, 3)))
    if kind == "delete_one":
        return ("DELETE FROM public.seqlog WHERE ctid = (SELECT min(ctid) FROM public.seqlog "
                "WHERE at = %s)", (at,))
    return ("UPDATE public.seqlog SET msg = %s WHERE ctid = (SELECT max(ctid) FROM "
            "public.seqlog WHERE at = %s)", (msg, at))


def random_change(rnd: random.Random, keys: set[int], added: list[str], keyless: bool
               ) -> tuple[str, tuple[object, ...]]:
    """One random change of public.seq (keys: the ids the model believes exist; ``added``:
    the columns added so far), or of public.seqlog (``keyless``)."""
    kind = rnd.choices(("insert", "touch", "doc", "move", "delete", "truncate", "copy",
                        "add_column", "log"),
                       (30, 20, 10, 15, 10, 2, 5, 2, 15 if keyless else 0))[0]
    if kind == "log":
        return _log_change(rnd)
    if kind == "add_column" and len(added) < len(_ADDED):
        name, type_sql, default = _ADDED[len(added)]
        added.append(name)
        return (f"ALTER TABLE public.seq ADD COLUMN {name} {type_sql}"
                + (f" DEFAULT {default}" if default else ""), ())
    existing = sorted(keys)
    if kind == "truncate":
        keys.clear()
        return "TRUNCATE public.seq", ()
    if kind in ("insert", "copy") or not existing:
        new = rnd.randint(1, 60)
        keys.add(new)
        big = rnd.random() < 0.5
        return ("INSERT INTO public.seq VALUES (%s, %s, CASE WHEN %s THEN repeat(md5(%s::text), "
                "300) ELSE %s END, CASE WHEN %s THEN decode(repeat(md5(%s::text), 200), 'hex') "
                "END, %s, %s) ON CONFLICT (id) DO UPDATE SET n = excluded.n, amount = "
                "excluded.amount",
                (new, rnd.randint(-5, 5), big, rnd.random(), rnd.choice(_HOSTILE_TEXT), big,
                 rnd.random(), rnd.choice(_AMOUNTS), rnd.choice(_TIMES)))
    key = rnd.choice(existing)
    if kind == "touch":  # TOASTed values untouched
        return ("UPDATE public.seq SET n = coalesce(n, 0) + 1, at = %s WHERE id = %s",
                (rnd.choice(_TIMES), key))
    if kind == "doc":
        return ("UPDATE public.seq SET doc = %s || repeat('d', %s) WHERE id = %s",
                (rnd.choice(("x", "🐘")), rnd.choice((0, 9000)), key))
    if kind == "move":  # a key update leaving the TOASTed values untouched
        target = rnd.randint(61, 120) if rnd.random() < 0.5 else rnd.randint(1, 60)
        if target in keys:
            return "SELECT 1", ()
        keys.discard(key)
        keys.add(target)
        return "UPDATE public.seq SET id = %s, n = -n WHERE id = %s", (target, key)
    keys.discard(key)
    return "DELETE FROM public.seq WHERE id = %s", (key,)
