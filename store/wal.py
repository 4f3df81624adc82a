"""The write-ahead log of one modality's index: append-only segment files of checksummed records.

A record is one acknowledged change (:class:`store.changes.Change`): its log sequence number (LSN), the operation, the ids, the
metadata, the model version (the sha256 of its manifest), the raw features (so that a later model
can re-embed the item) and the embedding. On disk: ``<u32 payload length><u32 zlib.crc32 of the
payload><payload>``; the payload is ``<u32 header length><header JSON><features><embeddings>``
(little-endian float32, shapes in the header).

A kill while a record is written leaves a torn tail: a short header, a length past the end of the
file, a checksum that does not match, or (after a power cut) zeros where the file grew. Such a bad
frame is a tear only at the very end of the last segment, when no whole record follows it: then the
file is cut back to the last whole record, which was never acknowledged (the answer waits for the
append and its fsync), so only unacknowledged changes are lost. A bad frame anywhere else (a whole
record after it, or in an older segment, closed and fsynced before the next one began), a gap in
the sequence numbers, or a record that does not decode is corruption: :class:`LogCorrupt` names the
file and the byte offset, and nothing is cut.

Segments are named by the first LSN they may hold (``00000000000000000042.wal``). A checkpoint
starts a new segment at its LSN + 1 and, once the checkpoint is on disk, deletes the older ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avdata.atomic import fsync_dir
from store.changes import Change
from store.layout import SEGMENT_SUFFIX, segment_name

log = logging.getLogger(__name__)
FRAME = struct.Struct("<II")  # payload length, crc32
HEADER_LENGTH = struct.Struct("<I")
RECORD_START = b'{"lsn":'  # how every header begins (encode writes the LSN first)
RECORD_START_OFFSET = FRAME.size + HEADER_LENGTH.size


class LogCorrupt(RuntimeError):
    """A record in the middle of the log does not read back (not a torn tail): refuse to guess."""


def encode(change: Change) -> bytes:
    """One frame: ``change`` with its LSN and model, as written to a segment."""
    arrays = [a for a in (change.features, change.embeddings) if a is not None]
    header = {
        "lsn": change.lsn,
        "op": change.op,
        "ids": change.ids,
        "model": change.model,
        "metadata": change.metadata,
        "shapes": [list(a.shape) for a in arrays],
    }
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    payload = b"".join([HEADER_LENGTH.pack(len(head)), head, *(np.ascontiguousarray(a, "<f4").tobytes() for a in arrays)])
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode(payload: bytes) -> Change:
    (n,) = HEADER_LENGTH.unpack_from(payload)
    header = json.loads(payload[4 : 4 + n])
    offset, arrays = 4 + n, []
    for shape in header["shapes"]:
        count = math.prod(shape)  # not np.prod: a third of a follower's time went to its overhead (bench/follow_cost.py --profile)
        arrays.append(np.frombuffer(payload, "<f4", count, offset).reshape(shape))
        offset += 4 * count
    features, embeddings = (arrays + [None, None])[:2]
    return Change(header["op"], header["ids"], header["metadata"], features, embeddings, header["lsn"], header["model"])


@dataclass
class Segment:
    """What one segment file holds: its whole records, where each starts, where they end, and
    whether a torn tail follows them."""

    path: Path
    records: list[Change]
    offsets: list[int]
    end: int
    torn: bool


def read_segment(path: Path, last: bool = True) -> Segment:
    """Read one segment; raises LogCorrupt for a bad frame that is not a tear: one with a whole
    record after it, or any in a segment that is not the ``last``."""
    blob = path.read_bytes()
    records, offsets, offset = [], [], 0
    while offset < len(blob):
        why = _bad_frame(blob, offset)
        if why is not None:
            following = _next_record(blob, offset)
            if last and following is None:
                return Segment(path, records, offsets, offset, True)
            _corrupt(path, offset, why, following, records)
        length, _ = FRAME.unpack_from(blob, offset)
        try:
            records.append(decode(blob[offset + FRAME.size : offset + FRAME.size + length]))
        except (ValueError, KeyError, TypeError, struct.error) as err:  # checksum right, content wrong: a bug, not a tear
            raise LogCorrupt(f"{path}: record at byte {offset} does not decode ({err})") from None
        offsets.append(offset)
        offset += FRAME.size + length
    return Segment(path, records, offsets, offset, False)


def check_sequence(segments: list[Segment], after_lsn: int) -> None:
    """Raise LogCorrupt unless the LSNs run on without a gap, from ``after_lsn`` + 1 (the first change
    the checkpoint lacks) for those after it: a missing record is an acknowledged change lost."""
    previous = 0
    for segment in segments:
        for record, offset in zip(segment.records, segment.offsets):
            expected = max(previous, after_lsn) + 1
            if record.lsn <= previous:
                what = f"out of order (after LSN {previous})"
            elif record.lsn > after_lsn and record.lsn != expected:
                what = f"a gap: changes {expected} to {record.lsn - 1} are missing"
            else:
                previous = record.lsn
                continue
            raise LogCorrupt(f"{segment.path}: record at byte {offset} has LSN {record.lsn}, {what} (the checkpoint holds changes through {after_lsn})")


def _bad_frame(blob: bytes, offset: int) -> str | None:
    """Why the frame at ``offset`` is not a whole record (None: it is)."""
    if offset + FRAME.size > len(blob):
        return "a short frame header"
    length, checksum = FRAME.unpack_from(blob, offset)
    if length < HEADER_LENGTH.size:  # eight zero bytes pass the checksum (crc32(b"") == 0) but hold no record
        return f"a frame of {length} bytes"
    if offset + FRAME.size + length > len(blob):
        return f"a length of {length} bytes past the end of the file"
    if zlib.crc32(memoryview(blob)[offset + FRAME.size : offset + FRAME.size + length]) != checksum:  # a view: no copy
        return "a checksum mismatch"
    return None


def _next_record(blob: bytes, after: int) -> int | None:
    """The offset of the first whole record starting after byte ``after``, if any. Every header
    starts with ``{"lsn":``, so only those places are checksummed."""
    at = after + 1 + RECORD_START_OFFSET
    while (at := blob.find(RECORD_START, at)) != -1:
        if _bad_frame(blob, at - RECORD_START_OFFSET) is None:
            return at - RECORD_START_OFFSET
        at += 1
    return None


def _corrupt(path: Path, offset: int, why: str, following: int | None, records: list[Change]) -> None:
    where = f"a whole record follows at byte {following}" if following is not None else "in a segment that is not the last"
    kept = f"the changes through LSN {records[-1].lsn}" if records else "no change of this segment"
    raise LogCorrupt(
        f"{path}: bad record at byte {offset} ({why}); {where}, so it is not a torn tail but a damaged log, and "
        f"acknowledged changes from byte {offset} on would be lost. Nothing was cut. Keep a copy of the log; then "
        f"restore a snapshot, or accept the loss and serve {kept} by cutting the file there "
        f"(truncate -s {offset} {path}) and moving the later segments aside"
    )


class WriteAheadLog:
    """Segments in ``directory``; one writer at a time (the modality's commit leader)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._fd: int | None = None
        self.segment: Path | None = None
        self.bytes_since_rotation = 0

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}"))

    def recover(self, after_lsn: int) -> list[Change]:
        """Records with an LSN above ``after_lsn`` (the checkpoint's), in order; a torn tail is cut off.

        Opens the last segment for appending (or starts one), so call it once, before any append.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        paths = self.segments()
        segments = [read_segment(path, last=i == len(paths) - 1) for i, path in enumerate(paths)]
        check_sequence(segments, after_lsn)
        if segments and segments[-1].torn:
            tail = segments[-1]
            log.warning("%s: torn record at byte %d cut off (a write a crash interrupted; never acknowledged with AVSEARCH_WAL_FSYNC=always)", tail.path, tail.end)
            with open(tail.path, "r+b") as f:
                f.truncate(tail.end)
                os.fsync(f.fileno())
        if paths:
            self._open(paths[-1])
        else:
            self.rotate(after_lsn + 1)
        return [r for segment in segments for r in segment.records if r.lsn > after_lsn]

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the kernel applies the umask
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.segment = fd, path
        self.bytes_since_rotation = os.fstat(fd).st_size

    def open_segment(self, first_lsn: int) -> None:
        """Append to the segment that starts at ``first_lsn`` (another process started it)."""
        self._open(self.directory / segment_name(first_lsn))

    @property
    def first_lsn(self) -> int:
        """The first LSN the current segment may hold (its name)."""
        assert self.segment is not None, "recover() first"
        return _first_lsn(self.segment)

    def rotate(self, first_lsn: int) -> None:
        """Start a new segment for LSNs from ``first_lsn`` on (the caller holds off appends)."""
        path = self.directory / segment_name(first_lsn)
        self.sync()  # the closed segment is whole on disk: only the last one may end in a tear
        self._open(path)
        fsync_dir(self.directory)  # the new file's name must survive a power cut too
        self.bytes_since_rotation = 0

    def end(self) -> int:
        """The current segment's size: where the next append starts (and where :meth:`cut` goes back to)."""
        assert self._fd is not None, "recover() first"
        return os.lseek(self._fd, 0, os.SEEK_END)

    def append(self, frames: bytes) -> int:
        """Write ``frames`` at the end of the current segment; returns the size before."""
        start = self.end()
        view = memoryview(frames)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.bytes_since_rotation += len(frames)
        return start

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def cut(self, size: int) -> None:
        """Take back a failed append: the file ends at ``size`` again (so no refused change replays)."""
        if self._fd is not None:
            end = os.fstat(self._fd).st_size
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
            self.bytes_since_rotation = max(0, self.bytes_since_rotation - (end - size))

    def drop_through(self, lsn: int) -> None:
        """Delete the segments before the current one that hold no record after ``lsn`` (a segment
        ends where the next begins)."""
        paths = self.segments()
        for path, following in zip(paths, paths[1:]):
            if path == self.segment or _first_lsn(following) - 1 > lsn:
                break
            path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _first_lsn(segment: Path) -> int:
    return int(segment.name[: -len(SEGMENT_SUFFIX)])


def read_records(directory: Path, after: int, through: int | None = None) -> list[Change]:
    """The whole records of every segment in ``directory`` with ``after < lsn <= through``, in LSN
    order, read without opening the log for writing (a torn tail ends a segment)."""
    records = []
    paths = sorted(Path(directory).glob(f"*{SEGMENT_SUFFIX}"))
    for i, path in enumerate(paths):
        found = read_segment(path, last=i == len(paths) - 1).records
        records.extend(r for r in found if r.lsn > after and (through is None or r.lsn <= through))
    return sorted(records, key=lambda r: r.lsn)
