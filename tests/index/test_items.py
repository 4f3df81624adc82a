"""The columnar item table against plain Python dicts: the slow, obvious reference."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from index.items import ItemTable, ItemTableError, RepeatedIdError, canonical_json, hash_ids, holds


class CollidingTable(ItemTable):
    KEY_MASK = np.uint64(3)  # four possible keys: nearly every lookup meets other ids' keys


class FewRecentTable(CollidingTable):
    RECENT_MOST = 5  # small appends become a run every few ids: the dict, its flushes and the runs all in play


def test_keys_are_blake2b_of_the_utf8_id():
    ids = [b"", b"a", b"clip-000001", "café ☕".encode(), b"x" * 300]
    assert hash_ids(ids).tolist() == [int.from_bytes(hashlib.blake2b(i, digest_size=8).digest(), "little") for i in ids]


def _roundtrip(table: ItemTable) -> ItemTable:
    buffer = io.BytesIO()
    table.save(buffer)
    buffer.seek(0)
    return type(table).load(buffer)


@pytest.mark.parametrize("table_class", [ItemTable, CollidingTable, FewRecentTable])
def test_random_operations_match_a_dict(table_class):
    """Appends of every size (so runs merge, and small ones wait in the dict of recent ids),
    removals, re-adds and reloads, checked after each step."""
    rng = np.random.default_rng(0)
    table = table_class()
    live: dict[str, tuple[int, dict | None]] = {}  # id -> (label, metadata)
    universe = [f"id-{i}" for i in range(3000)] + ["ü-ñ-日本", "a b", "x" * 200]
    for step in range(60):
        if rng.random() < 0.6 or not live:
            size = int(rng.choice([1, 2, 7, 100, 600]))
            batch = list(dict.fromkeys(universe[j] for j in rng.integers(0, len(universe), size)))
            meta = [None if rng.random() < 0.5 else {"n": int(rng.integers(3)), "tag": str(rng.choice(["a", "b"]))} for _ in batch]
            replaced, labels = table.upsert(batch, meta)
            assert sorted(replaced.tolist()) == sorted(live[i][0] for i in batch if i in live)
            for label, item_id, m in zip(labels.tolist(), batch, meta):
                live[item_id] = (label, m)
        else:
            gone = [k for k in live if rng.random() < 0.3]
            table.kill(table.labels_of(gone))
            for k in gone:
                del live[k]
        if step % 15 == 14:
            table = _roundtrip(table)
        if step % 20 == 19:
            table.consolidate()
            assert len(table._runs) == 1
        assert len(table) == len(live) and len(table._runs) <= max(1, int(np.log2(max(table.rows, 1))) + 1)
        probe = universe[::7] + ["never-added"]
        expected = [live[i][0] if i in live else -1 for i in probe]
        assert table.labels_of(probe).tolist() == expected
        assert [int(table.labels_of([i])[0]) for i in probe] == expected  # one id at a time: its own path
        labels = np.array(sorted(label for label, _ in live.values()), np.int64)
        assert table.live_labels().tolist() == labels.tolist()
        by_label = {label: (i, m) for i, (label, m) in live.items()}
        assert table.ids_of(labels) == [by_label[lab][0] for lab in labels.tolist()]
        assert table.metadata_of(labels) == [by_label[lab][1] for lab in labels.tolist()]
        for conditions in ({"n": 1}, {"tag": "a", "n": 2}, {"n": True}, {"tag": "c"}):
            want = sorted(label for label, m in live.values() if holds(m, conditions))
            assert table.matching(conditions).tolist() == want


def test_matching_is_exact_for_tricky_values():
    metadata = [
        {"genre": "rock", "year": 1999},
        {"genre": "rockabilly", "year": 19990},
        {"genre": "pop", "inner": {"genre": "rock"}},  # the pair, but nested: not a match
        {"genre": "rock", "live": True, "score": 0.5},
        {"year": 1999.0},  # a float is not the int 1999
        {"live": 1},  # 1 is not true
        {"note": 'says "genre":"rock" in text'},
        {"score": -0.0},
        None,
        {"genre": "rock", "tags": ["a", "b"], "nested": {"b": 2, "a": 1}},
    ]
    table = ItemTable()
    table.upsert([f"i{n}" for n in range(len(metadata))], metadata)
    table.kill(np.array([9]))
    for conditions in ({"genre": "rock"}, {"year": 1999}, {"year": 1999.0}, {"live": True}, {"live": 1}, {"score": 0.0},
                       {"inner": {"genre": "rock"}}, {"genre": "rock", "live": True}, {"nested": {"a": 1, "b": 2}}, {"missing": None}):
        want = [n for n, m in enumerate(metadata) if n != 9 and holds(m, conditions)]
        assert table.matching(conditions).tolist() == want, conditions
    assert table.matching({"genre": "rock"}).tolist() == [0, 3]
    assert table.matching({"score": 0.0}).tolist() == [7]  # -0.0 == 0.0, as in Python


def test_saved_table_is_byte_stable_and_checked():
    table = ItemTable()
    table.upsert(["a", "b"], [{"k": 1}, None])
    first, second = io.BytesIO(), io.BytesIO()
    table.save(first)
    _roundtrip(table).save(second)
    assert first.getvalue() == second.getvalue()
    for cut in (1, 100, len(first.getvalue()) - 1):  # torn in the last array's data, a header, the first magic string
        with pytest.raises(ItemTableError, match=r"^item table unreadable \(EOF: reading "):
            ItemTable.load(io.BytesIO(first.getvalue()[:-cut]))
    newer = io.BytesIO()
    np.lib.format.write_array(newer, np.frombuffer(b'{"format": 99, "rows": 0, "runs": 0}', np.uint8))
    with pytest.raises(ItemTableError, match="item table format 99 .* written by another avsearch version"):
        ItemTable.load(io.BytesIO(newer.getvalue()))


def test_table_from_an_old_id_map():
    table = ItemTable.from_mapping({"a": 0, "c": 4, "b": 2}, {"c": {"t": 1}}, rows=6)
    assert table.rows == 6 and len(table) == 3
    assert table.labels_of(["a", "b", "c", "d"]).tolist() == [0, 2, 4, -1]
    assert table.metadata_of([4, 0]) == [{"t": 1}, None]
    assert canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'


def _table_with_runs(n: int = 5000) -> ItemTable:
    table = ItemTable()
    table.RECENT_MOST = 0  # each upsert a run
    for start in range(0, n, 700):  # several runs of the lookup, as between two saves
        table.upsert([f"r{i}" for i in range(start, min(n, start + 700))], [{"i": i} for i in range(start, min(n, start + 700))])
    assert len(table._runs) > 1
    return table


def test_a_save_changes_nothing_a_concurrent_reader_sees():
    """The service saves under a read lock while searches and lookups go on: a save must not edit the table."""
    import threading

    table = _table_with_runs()
    del table.RECENT_MOST
    table.upsert(["late-1"])
    table.upsert(["late-2"])  # ids not yet in a run: a save writes them as one more, and keeps them
    probe = [f"r{i}" for i in range(0, 5000, 37)] + ["late-1", "late-2"]
    want = table.labels_of(probe).tolist()
    misses, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if table.labels_of(probe).tolist() != want:
                misses.append(1)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(30):
            table.save(io.BytesIO())
    finally:
        stop.set()
        thread.join()
    assert not misses and len(table._runs) > 1 and len(table._recent) == 2
    assert _roundtrip(table).labels_of(probe).tolist() == want


def test_a_failed_write_changes_nothing():
    table = _table_with_runs(2100)
    before = (table.rows, len(table), table.labels_of(["r5", "r2099"]).tolist())
    with pytest.raises(ItemTableError, match="'r5'"):
        table.upsert(["r5", "new"], [{"n": np.int64(3)}, None])  # a numpy scalar is not JSON
    with pytest.raises(RepeatedIdError, match="unique; 'x' is at positions 1 and 3") as repeated:
        table.upsert(["y", "x", "z", "x"])
    assert (repeated.value.item_id, repeated.value.rows) == ("x", (1, 3))
    with pytest.raises(KeyError, match="not a live row"):
        table.kill(np.array([-1]))
    assert (table.rows, len(table), table.labels_of(["r5", "r2099"]).tolist()) == before
    assert table.ids_of(np.array([5, 2099])) == ["r5", "r2099"] and table.metadata_of([5]) == [{"i": 5}]


def test_an_upsert_after_a_failed_save_still_works():
    """A save that dies midway (disk full) may leave its traceback alive; the table must stay writable."""

    class DiskFull(io.BytesIO):
        def write(self, blob) -> int:
            if self.tell() > 1000:
                raise OSError(28, "No space left on device")
            return super().write(blob)

    table = _table_with_runs(2100)
    with pytest.raises(OSError, match="No space left on device") as failed:
        table.save(DiskFull())
    kept = failed.value  # noqa: F841  (the frames stay referenced, as in a logged or awaited exception)
    table.upsert(["after"], [{"ok": True}])
    assert table.ids_of(table.labels_of(["after", "r0"])) == ["after", "r0"]
    assert _roundtrip(table).metadata_of(table.labels_of(["after"])) == [{"ok": True}]


def test_the_alive_bitmap_follows_every_write_and_a_load():
    """Kept by each append and kill (a search after a write packs no N bits): always equal to
    packing the alive column from scratch, across byte boundaries, reservations and a reload."""
    rng = np.random.default_rng(4)
    table = ItemTable()
    live: list[str] = []
    for step in range(300):
        if live and rng.random() < 0.4:
            gone = list(rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False))
            table.kill(table.labels_of(gone))
            live = [i for i in live if i not in gone]
        else:
            new = [f"s{step}-{j}" for j in range(int(rng.integers(1, 12)))]
            table.upsert(new)
            live += new
        if step == 150:
            table.reserve(100)
        np.testing.assert_array_equal(table.alive_bitmap(), np.packbits(table.alive, bitorder="little"))
    buffer = io.BytesIO()
    table.save(buffer)
    buffer.seek(0)
    loaded = ItemTable.load(buffer)
    np.testing.assert_array_equal(loaded.alive_bitmap(), np.packbits(table.alive, bitorder="little"))
