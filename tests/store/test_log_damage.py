"""The log's reader on damaged files: only a bad frame at the very end of the last segment is a torn
tail (cut off); anything else (a flipped byte mid-log, a bad frame in an older segment, a gap in the
sequence numbers) is corruption, refused with the file and the byte offset, and nothing is cut."""

from __future__ import annotations

import os

import numpy as np
import pytest

from store.changes import Change
from store.wal import FRAME, LogCorrupt, WriteAheadLog, encode


def _record(lsn: int) -> Change:
    rng = np.random.default_rng(lsn)
    return Change("upsert", [f"id-{lsn}"], [{"n": lsn}], rng.random((1, 5), np.float32), rng.random((1, 3), np.float32), lsn, "m" * 64)


def _log(directory, segments: list[list[int]]) -> list[tuple[os.PathLike, list[int]]]:
    """Segments holding the records of these LSNs (as a fold whose save failed leaves them); returns
    each segment's path and the byte offsets of its records."""
    wal = WriteAheadLog(directory)
    wal.recover(0)
    out = []
    for i, lsns in enumerate(segments):
        if i:
            wal.rotate(lsns[0])
        offsets = [wal.append(encode(_record(lsn))) for lsn in lsns]
        out.append((wal.segment, offsets))
    wal.close()
    return out


def _damage(path, offset: int, blob: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(blob)


def _refused(directory, path, offset: int) -> str:
    before = path.read_bytes()
    with pytest.raises(LogCorrupt) as err:
        WriteAheadLog(directory).recover(0)
    assert str(path) in str(err.value) and f"byte {offset}" in str(err.value), err.value
    assert path.read_bytes() == before  # nothing cut: no acknowledged change is dropped quietly
    return str(err.value)


def test_a_zero_tail_is_a_torn_tail_not_a_record(tmp_path):
    """A power cut can leave the file longer than what was written, the rest zeros: crc32(b"") is 0,
    so eight zero bytes look like a whole empty frame. They are a tear, cut off; the records stay."""
    [(path, _)] = _log(tmp_path, [[1, 2, 3]])
    whole = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    assert [r.lsn for r in WriteAheadLog(tmp_path).recover(0)] == [1, 2, 3]
    assert path.stat().st_size == whole


@pytest.mark.parametrize("where", ["payload", "length", "zeros"])
def test_a_bad_record_followed_by_whole_ones_is_corruption(tmp_path, where):
    """One flipped byte inside record 2 of 3 (or a zeroed page) must not drop records 2 and 3."""
    [(path, offsets)] = _log(tmp_path, [[1, 2, 3]])
    second = offsets[1]
    blob = path.read_bytes()
    if where == "payload":
        _damage(path, second + FRAME.size + 20, bytes([blob[second + FRAME.size + 20] ^ 0x10]))
    elif where == "length":  # the length now runs past the end of the file: still not the end of the log
        _damage(path, second, (10**6).to_bytes(4, "little"))
    else:
        _damage(path, second, b"\0" * (offsets[2] - second))
    message = _refused(tmp_path, path, second)
    assert "not a torn tail" in message and "truncate" in message  # what the operator may do, and what it costs


def test_a_bad_frame_at_the_end_of_an_older_segment_is_corruption(tmp_path):
    """Only the last segment can end in a tear: an older one was closed (and fsynced) before the next began."""
    (old, offsets), (new, _) = _log(tmp_path, [[1, 2], [3, 4]])
    _damage(old, offsets[1] + FRAME.size + 3, b"\xff")
    _refused(tmp_path, old, offsets[1])
    (tmp_path / "again").mkdir()
    (old, offsets), _ = _log(tmp_path / "again", [[1, 2], [3]])
    with open(old, "r+b") as f:  # a short last record in an older segment
        f.truncate(offsets[1] + 6)
    _refused(tmp_path / "again", old, offsets[1])


def test_a_gap_in_the_sequence_numbers_is_corruption(tmp_path):
    (first, _), (second, offsets) = _log(tmp_path, [[1, 2], [4, 5]])  # record 3 is missing
    message = _refused(tmp_path, second, offsets[0])
    assert "gap" in message and "3" in message
    (tmp_path / "inside").mkdir()
    [(path, offsets)] = _log(tmp_path / "inside", [[1, 2, 5]])
    _refused(tmp_path / "inside", path, offsets[2])


def test_a_gap_after_the_snapshot_is_corruption(tmp_path):
    """The snapshot holds changes through 2; a log starting at 4 lost change 3."""
    [(path, offsets)] = _log(tmp_path, [[4, 5]])
    with pytest.raises(LogCorrupt, match=r"gap.*byte 0"):
        WriteAheadLog(tmp_path).recover(2)
    assert [r.lsn for r in WriteAheadLog(tmp_path).recover(3)] == [4, 5]


def test_rotate_fsyncs_the_segment_it_closes(tmp_path, monkeypatch):
    """With AVSEARCH_WAL_FSYNC=never, the closed segment's last records must reach the disk before
    the next segment (and a snapshot after it) can make the log read past them."""
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    wal = WriteAheadLog(tmp_path)
    wal.recover(0)
    wal.append(encode(_record(1)))
    closing = str(wal.segment)
    synced.clear()
    wal.rotate(2)
    wal.close()
    assert closing in synced
