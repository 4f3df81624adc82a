"""The item table: string ids ↔ FAISS labels, and each item's JSON metadata, in flat arrays.

A FAISS index holds int64 labels; this table gives them the caller's string ids and metadata. A
label is a row number: rows are appended, never reused, and a removed (or replaced) item's row is
marked dead. Everything is columnar, so 10^8 items cost a few GB where Python dicts cost ~170 bytes
an item (measured in ``bench/scale_bench.py``):

* **ids**: the UTF-8 bytes of every row end to end, and the offsets where each starts (Arrow's
  string layout): 8 bytes an item plus the id itself;
* **metadata**: each row's JSON object in canonical form (sorted keys, no spaces), laid out the
  same way; an empty entry means "no metadata". The offsets exist only once an item has metadata;
* **alive**: one bool a row;
* **lookup** (id → label): sorted runs of (64-bit BLAKE2b key of the id, row), 16 bytes an item. A
  key only narrows the search: each candidate is confirmed by comparing the id's bytes, so a
  collision costs one comparison, never a wrong answer. An upsert adds a run; runs merge like a
  binary counter (a run is merged into the one before it while that one is less than twice its
  size), so there are at most log2(N) runs and loading N items in batches costs O(N log N). A merge
  drops the keys of dead rows. A save writes the runs as they are (and the recent ids as one more).
  Ids appended a few at a time (a service's single-item writes, each applied by every worker
  process) wait in a dict (id bytes → row) until ``RECENT_MOST`` of them make one run: a run for
  each write, and its merges, cost a dozen numpy calls each time. Lookups and removals of a few ids
  likewise take scalar steps (``SCALAR_MOST``). Together: one upsert applied at 10^6 Flat items
  took half the CPU (``bench/follow_step.py``).

Every column is a numpy array that grows by reallocation (never in place), so a view handed out
(to a save, a regex scan) can never block a later append. A write computes everything that can
fail (encoding, JSON) before it changes anything. Reads (``labels_of``, ``ids_of``, ``save``...)
change nothing, so they may run concurrently with each other; a write must run alone.

Metadata filters (:meth:`ItemTable.matching`) search the canonical JSON bytes for the first
scalar condition's ``"key":value`` text (C speed) and decode only the rows that contain it: a row
that holds the pair always contains that text, so the pre-filter never drops a match.
"""

from __future__ import annotations

import json
import re
from hashlib import blake2b
from itertools import accumulate
from typing import BinaryIO

import numpy as np

SCALAR_MOST = 16  # ids a lookup or removal handles one by one, in Python: below this, cheaper than numpy's per-call cost
FORMAT = 1  # version of the saved table (``items.bin``), also recorded in the index's info.json


class ItemTableError(ValueError):
    """A saved table that cannot be read (torn, another format), or metadata that is not JSON."""


class RepeatedIdError(ValueError):
    """One upsert names the same id twice (``.item_id``, its ``.rows`` in the upsert)."""

    def __init__(self, item_id: str, rows: tuple[int, int]):
        super().__init__(f"ids in one upsert must be unique; {item_id!r} is at positions {rows[0]} and {rows[1]}")
        self.item_id, self.rows = item_id, rows


def first_repeat(ids: list[str]) -> tuple[str, tuple[int, int]] | None:
    """The first id that occurs twice in ``ids`` and the positions of both, or None."""
    seen: dict[str, int] = {}
    for row, item_id in enumerate(ids):
        if item_id in seen:
            return item_id, (seen[item_id], row)
        seen[item_id] = row
    return None


def hash_ids(encoded: list[bytes]) -> np.ndarray:
    """(n,) uint64 keys of UTF-8 ids: 8-byte BLAKE2b digests (~1 µs an id, C speed, well mixed)."""
    return np.frombuffer(b"".join([blake2b(e, digest_size=8).digest() for e in encoded]), np.uint64).copy()


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def holds(metadata: dict | None, conditions: dict) -> bool:
    """Every key: value of ``conditions`` is in ``metadata``, with the same JSON type (true ≠ 1)."""
    return metadata is not None and all(k in metadata and type(metadata[k]) is type(v) and metadata[k] == v for k, v in conditions.items())


class Column:
    """A 1-D numpy array with amortised O(1) appends: the capacity doubles when it runs out."""

    def __init__(self, values: np.ndarray, size: int | None = None):
        self._data, self.size = values, len(values) if size is None else size  # values[size:]: room

    def extend(self, values: np.ndarray | bytes) -> None:
        values = np.frombuffer(values, np.uint8) if isinstance(values, bytes) else values
        need = self.size + len(values)
        if need > len(self._data):
            self._grow(max(need, 2 * len(self._data), 16))
        self._data[self.size : need] = values
        self.size = need

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more values without a reallocation."""
        if self.size + extra > len(self._data):
            self._grow(self.size + extra)

    def _grow(self, capacity: int) -> None:
        grown = np.empty(capacity, self._data.dtype)  # a new array: views handed out keep the old one
        grown[: self.size] = self._data[: self.size]
        self._data = grown

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


def _ends(start: int, entries: list[bytes]) -> np.ndarray:
    """Where each entry ends once appended to a byte column now ``start`` long (its next offsets)."""
    return np.fromiter(accumulate(map(len, entries), initial=start), np.int64, len(entries) + 1)[1:]


def _slices(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
    """data[starts[i]:ends[i]] for every i, gathered in one numpy pass (fast for many short slices)."""
    if len(starts) <= 16:  # a few: plain slices beat the gather's fixed cost
        return [data[s:e].tobytes() for s, e in zip(starts.tolist(), ends.tolist())]
    lengths = ends - starts
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    gathered = data[np.repeat(starts - bounds[:-1], lengths) + np.arange(bounds[-1])].tobytes()
    b = bounds.tolist()
    return [gathered[b[i] : b[i + 1]] for i in range(len(lengths))]


def _live(run: tuple[np.ndarray, np.ndarray], alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys, rows = run
    keep = alive[rows]
    return run if keep.all() else (keys[keep], rows[keep])


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray], alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sorted run of the live entries of two sorted runs, in linear time (new arrays)."""
    (k1, r1), (k2, r2) = _live(older, alive), _live(newer, alive)
    at = np.searchsorted(k1, k2) + np.arange(len(k2))  # where newer's entries land in the merged order
    keys, rows = np.empty(len(k1) + len(k2), np.uint64), np.empty(len(k1) + len(k2), np.int64)
    from_newer = np.zeros(len(keys), bool)
    from_newer[at] = True
    keys[at], rows[at] = k2, r2
    keys[~from_newer], rows[~from_newer] = k1, r1
    return keys, rows


class ItemTable:
    """Rows of (id, metadata, alive); a row number is the item's FAISS label."""

    KEY_MASK = np.uint64(2**64 - 1)  # bits of the id hash kept as the lookup key (tests keep 2: collisions)
    RECENT_MOST = 1024  # ids appended in small batches looked up in a dict until this many make a run

    def __init__(self) -> None:
        self._id_bytes = Column(np.zeros(0, np.uint8))
        self._id_offsets = Column(np.zeros(1, np.int64))  # row r's id: _id_bytes[off[r]:off[r + 1]]
        self._meta_bytes = Column(np.zeros(0, np.uint8))
        self._meta_offsets: Column | None = None  # created with the first metadata
        self._alive = Column(np.zeros(0, bool))
        self._alive_bits = Column(np.zeros(0, np.uint8))  # the same, packed 8 rows a byte (FAISS's ID selector bitmap)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted uint64 keys, int64 rows); replaced, never edited
        self._recent: dict[bytes, int] = {}  # id -> row of small appends not yet in a run; replaced when they become one
        self.live = 0

    # --- size and rows -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.live

    @property
    def rows(self) -> int:
        """Rows ever appended, dead ones included: the next label."""
        return self._alive.size

    @property
    def alive(self) -> np.ndarray:
        """(rows,) bool view."""
        return self._alive.values

    def live_labels(self) -> np.ndarray:
        return np.flatnonzero(self.alive)

    def alive_bitmap(self) -> np.ndarray:
        """(ceil(rows / 8),) uint8 view: bit r % 8 (little-endian) of byte r // 8 is set when row r is
        live, as ``faiss.IDSelectorBitmap`` reads it. Kept by every write, so a search after a
        write does not pack N bits again."""
        return self._alive_bits.values

    def _pack_bits_from(self, row: int) -> None:
        """Re-pack the bitmap from the byte holding ``row`` to the end (after rows were appended)."""
        first_byte = row // 8
        self._alive_bits.size = first_byte
        self._alive_bits.extend(np.packbits(self.alive[first_byte * 8 :], bitorder="little"))

    # --- writes --------------------------------------------------------------------------------
    def upsert(self, ids: list[str], metadata: list[dict | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """New rows for ``ids`` (unique): returns (labels of the rows they replace, now dead; their new labels)."""
        if len(set(ids)) != len(ids):
            raise RepeatedIdError(*first_repeat(ids))  # the slower search for which one only on failure
        encoded = [i.encode() for i in ids]
        keys = hash_ids(encoded) & self.KEY_MASK
        blobs = self._metadata_blobs(ids, metadata)
        replaced = self._find(encoded, keys)
        replaced = replaced[replaced >= 0]
        self.kill(replaced)
        return replaced, self._append(encoded, keys, blobs)

    @staticmethod
    def _metadata_blobs(ids: list[str], metadata: list[dict | None] | None) -> list[bytes] | None:
        if metadata is None or all(m is None for m in metadata):
            return None
        blobs = []
        for item_id, m in zip(ids, metadata):
            try:
                blobs.append(b"" if m is None else canonical_json(m))
            except (TypeError, ValueError) as err:
                raise ItemTableError(f"metadata of {item_id!r} is not a JSON object ({err})") from None
        return blobs

    def _append(self, encoded: list[bytes], keys: np.ndarray, blobs: list[bytes] | None) -> np.ndarray:
        first = self.rows
        self._id_offsets.extend(_ends(self._id_bytes.size, encoded))
        self._id_bytes.extend(b"".join(encoded))
        if blobs is not None and self._meta_offsets is None:  # the first metadata: every earlier row has none
            room = max(len(encoded), (first + 1) // 4)  # np.zeros maps untouched zero pages: room costs no time
            self._meta_offsets = Column(np.zeros(first + 1 + room, np.int64), first + 1)
        if self._meta_offsets is not None:
            blobs = blobs or [b""] * len(encoded)
            self._meta_offsets.extend(_ends(self._meta_bytes.size, blobs))
            self._meta_bytes.extend(b"".join(blobs))
        self._alive.extend(np.ones(len(encoded), bool))
        self._pack_bits_from(first)
        self.live += len(encoded)
        labels = np.arange(first, first + len(encoded), dtype=np.int64)
        if len(encoded) + len(self._recent) > self.RECENT_MOST:
            order = np.argsort(keys, kind="stable")
            self._add_run((keys[order], labels[order]))
        else:
            self._recent.update(zip(encoded, labels.tolist()))
            if len(self._recent) >= self.RECENT_MOST:
                self._flush_recent()
        return labels

    def _add_run(self, run: tuple[np.ndarray, np.ndarray]) -> None:
        runs = [*self._runs, run]
        while len(runs) > 1 and len(runs[-2][0]) < 2 * len(runs[-1][0]):
            runs[-2:] = [_merge(runs[-2], runs[-1], self.alive)]
        self._runs = runs  # one assignment: a reader sees the old list or the new one

    def _recent_run(self) -> tuple[np.ndarray, np.ndarray]:
        """The recent ids as a sorted run (keys, rows)."""
        keys = hash_ids(list(self._recent)) & self.KEY_MASK
        rows = np.fromiter(self._recent.values(), np.int64, len(keys))
        order = np.argsort(keys, kind="stable")
        return keys[order], rows[order]

    def _flush_recent(self) -> None:
        """The recent ids become a run. The runs are replaced before the dict: a reader that took
        the dict first, then the runs (as lookups do), finds every id in one or the other."""
        if self._recent:
            self._add_run(self._recent_run())
            self._recent = {}

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` more rows (ids and metadata as long as the average so far, at least
        16 and 32 bytes) without a reallocation: a table just loaded has none, so its first append
        would copy every column. A write."""
        def average(column: Column, floor: int) -> int:
            return max(floor, -(-column.size // max(self.rows, 1)))

        self._id_offsets.reserve(extra)
        self._id_bytes.reserve(extra * average(self._id_bytes, 16))
        self._alive.reserve(extra)
        self._alive_bits.reserve(extra // 8 + 1)
        if self._meta_offsets is not None:
            self._meta_offsets.reserve(extra)
            self._meta_bytes.reserve(extra * average(self._meta_bytes, 32))

    def consolidate(self) -> None:
        """Merge the lookup runs into one (fastest lookups; e.g. once a bulk load is done). A write."""
        self._flush_recent()
        runs = self._runs
        while len(runs) > 1:
            runs = [*runs[:-2], _merge(runs[-2], runs[-1], self.alive)]
        self._runs = runs

    def kill(self, labels: np.ndarray) -> None:
        """Mark live rows dead (their labels are never reused); KeyError for a label that is not live."""
        labels = np.asarray(labels, np.int64)
        if len(labels) <= SCALAR_MOST:  # a few (a service's single-item writes): scalar steps, not a dozen array calls
            self._kill_few(set(labels.tolist()))
            return
        labels = np.unique(labels)
        if labels[0] < 0 or labels[-1] >= self.rows or not self.alive[labels].all():
            raise KeyError("kill() of a label that is not a live row")
        self.alive[labels] = False
        np.bitwise_and.at(self._alive_bits.values, labels // 8, ~np.left_shift(1, labels % 8).astype(np.uint8))
        self.live -= len(labels)

    def _kill_few(self, labels: set[int]) -> None:
        alive, bits = self.alive, self._alive_bits.values
        if not all(0 <= label < len(alive) and alive[label] for label in labels):
            raise KeyError("kill() of a label that is not a live row")
        for label in labels:
            alive[label] = False
            bits[label // 8] &= ~(1 << (label % 8)) & 0xFF
        self.live -= len(labels)

    # --- reads ---------------------------------------------------------------------------------
    def labels_of(self, ids: list[str]) -> np.ndarray:
        """(n,) labels of the live items with these ids; -1 where there is none."""
        encoded = [i.encode() for i in ids]
        return self._find(encoded, hash_ids(encoded) & self.KEY_MASK)

    def _find(self, encoded: list[bytes], keys: np.ndarray) -> np.ndarray:
        if len(encoded) <= SCALAR_MOST:  # a few items changed or read at a time: scalar steps, not a dozen array calls a run
            return np.array([self._find_one(e, key) for e, key in zip(encoded, keys)], np.int64)
        recent, runs = self._recent, self._runs  # in this order (_flush_recent)
        offsets, data, alive = self._id_offsets.values, self._id_bytes.values, self.alive
        found = np.array([recent.get(e, -1) for e in encoded], np.int64)
        hit = found >= 0
        found[hit] = np.where(alive[found[hit]], found[hit], -1)  # a recent row since killed: looked for in the runs
        for run_keys, run_rows in runs:
            if not len(run_keys):
                continue
            lo = np.searchsorted(run_keys, keys)
            queries = np.flatnonzero((run_keys[np.minimum(lo, len(run_keys) - 1)] == keys) & (found < 0))
            if not len(queries):
                continue
            rows = run_rows[lo[queries]]  # the first candidate of each: almost always the only one
            stored = _slices(data, offsets[rows], offsets[rows + 1])
            confirmed = np.array([live and s == encoded[q] for q, s, live in zip(queries.tolist(), stored, alive[rows].tolist())], bool)
            found[queries[confirmed]] = rows[confirmed]
            after = np.minimum(lo[queries] + 1, len(run_keys) - 1)
            for q in queries[(lo[queries] + 1 < len(run_keys)) & (run_keys[after] == keys[queries]) & ~confirmed].tolist():
                for row in run_rows[lo[q] : np.searchsorted(run_keys, keys[q], "right")].tolist():  # keys that collide
                    if alive[row] and data[offsets[row] : offsets[row + 1]].tobytes() == encoded[q]:
                        found[q] = row
                        break
        return found

    def _find_one(self, encoded: bytes, key: np.uint64) -> int:
        """:meth:`_find` for one id: its live row, or -1."""
        recent, runs = self._recent, self._runs  # in this order (_flush_recent)
        offsets, data, alive = self._id_offsets.values, self._id_bytes.values, self.alive
        row = recent.get(encoded, -1)
        if row >= 0 and alive[row]:
            return row
        for run_keys, run_rows in runs:
            at = int(run_keys.searchsorted(key))
            while at < len(run_keys) and run_keys[at] == key:  # keys that collide: each confirmed by its bytes
                row = int(run_rows[at])
                if alive[row] and data[offsets[row] : offsets[row + 1]].tobytes() == encoded:
                    return row
                at += 1
        return -1

    def ids_of(self, labels: np.ndarray) -> list[str]:
        labels = np.asarray(labels, np.int64)
        offsets = self._id_offsets.values
        return [s.decode() for s in _slices(self._id_bytes.values, offsets[labels], offsets[labels + 1])]

    def metadata_of(self, labels: np.ndarray) -> list[dict | None]:
        if self._meta_offsets is None:
            return [None] * len(labels)
        labels = np.asarray(labels, np.int64)
        offsets = self._meta_offsets.values
        return [json.loads(s) if s else None for s in _slices(self._meta_bytes.values, offsets[labels], offsets[labels + 1])]

    def matching(self, conditions: dict) -> np.ndarray:
        """Sorted labels of the live items whose metadata holds every key: value of ``conditions``
        (non-empty: an empty filter is no filter, the caller's to skip)."""
        if self._meta_offsets is None:
            return np.zeros(0, np.int64)
        offsets = self._meta_offsets.values
        scalar = [(k, v) for k, v in conditions.items() if isinstance(v, (str, int, float)) or v is None]
        if scalar:
            key, value = scalar[0]
            # '"key":value' exactly as stored; a float equal to zero is stored as 0.0 or -0.0, which compare equal
            spellings = (0.0, -0.0) if isinstance(value, float) and value == 0 else (value,)
            pattern = b"|".join(re.escape(canonical_json({key: v})[1:-1]) for v in spellings)
            text = memoryview(self._meta_bytes.values)
            starts = np.fromiter((m.start() for m in re.finditer(b"(?=" + pattern + b")", text)), np.int64)
            candidates = np.unique(np.searchsorted(offsets, starts, "right") - 1)
        else:
            candidates = np.flatnonzero(np.diff(offsets) > 0)
        candidates = candidates[self.alive[candidates]]
        keep = np.array([holds(m, conditions) for m in self.metadata_of(candidates)], bool)
        return candidates[keep]

    # --- files ---------------------------------------------------------------------------------
    def save(self, file: BinaryIO) -> None:
        """A header (JSON: format, rows, runs), the columns as consecutive ``.npy`` arrays, then each
        lookup run's keys and rows as they are (no merge, no concatenation: no copy of a 10^8-item
        table). Written front to back, so the caller can hash the stream as it goes; equal tables
        give equal bytes."""
        runs = [*self._runs, self._recent_run()] if self._recent else self._runs  # saved as one more run
        meta_offsets = self._meta_offsets.values if self._meta_offsets is not None else np.zeros(0, np.int64)
        header = json.dumps({"format": FORMAT, "rows": self.rows, "runs": len(runs)})
        np.lib.format.write_array(file, np.frombuffer(header.encode(), np.uint8), allow_pickle=False)
        for array in (self._id_bytes.values, self._id_offsets.values, self.alive, self._meta_bytes.values, meta_offsets, *(a for run in runs for a in run)):
            np.lib.format.write_array(file, array, allow_pickle=False)

    @classmethod
    def load(cls, file: BinaryIO) -> "ItemTable":
        def read() -> np.ndarray:
            return np.lib.format.read_array(file, allow_pickle=False)

        try:
            header = json.loads(read().tobytes())
            if header.get("format") != FORMAT:
                raise ItemTableError(f"item table format {header.get('format')} (this version reads {FORMAT}): written by another avsearch version")
            id_bytes, id_offsets, alive, meta_bytes, meta_offsets = (read() for _ in range(5))
            runs = [(read(), read()) for _ in range(header["runs"])]
        except (ValueError, OSError, EOFError, KeyError, AttributeError, TypeError) as err:
            raise err if isinstance(err, ItemTableError) else ItemTableError(f"item table unreadable ({err})") from None
        table = cls()
        table._id_bytes, table._id_offsets, table._alive, table._runs = Column(id_bytes), Column(id_offsets), Column(alive), runs
        table._pack_bits_from(0)
        if len(meta_offsets):
            table._meta_bytes, table._meta_offsets = Column(meta_bytes), Column(meta_offsets)
        table.live = int(table.alive.sum())
        rows = table.rows
        if rows != header["rows"] or len(id_offsets) != rows + 1 or id_offsets[-1] != len(id_bytes) or sum(len(k) for k, _ in runs) < table.live:
            raise ItemTableError("item table columns disagree")
        if len(meta_offsets) and (len(meta_offsets) != rows + 1 or meta_offsets[-1] != len(meta_bytes)):
            raise ItemTableError("item table metadata columns disagree")
        return table

    @classmethod
    def from_mapping(cls, labels: dict[str, int], metadata: dict[str, dict], rows: int = 0) -> "ItemTable":
        """The table of an index saved by an earlier version (``items.json``: id → label, id → metadata);
        ``rows``: at least this many (labels of HNSW tombstones lie beyond the live ones)."""
        rows = max(rows, max(labels.values(), default=-1) + 1)
        ids = [""] * rows  # labels freed by removals: dead rows, killed below
        for item_id, label in labels.items():
            ids[label] = item_id
        meta: list[dict | None] = [None] * rows
        for item_id, value in metadata.items():
            meta[labels[item_id]] = value
        table = cls()
        encoded = [i.encode() for i in ids]
        table._append(encoded, hash_ids(encoded) & cls.KEY_MASK, cls._metadata_blobs(ids, meta))
        table.kill(np.setdiff1d(np.arange(rows), np.fromiter(labels.values(), np.int64, len(labels))))
        return table
