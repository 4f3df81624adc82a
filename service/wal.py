"""The write-ahead log of one modality's index: append-only segment files of checksummed records.

A record is one acknowledged change: its log sequence number (LSN), the operation, the ids, the
metadata, the model version (the sha256 of its manifest), the raw features (so that a later model
can re-embed the item) and the embedding. On disk: ``<u32 payload length><u32 zlib.crc32 of the
payload><payload>``; the payload is ``<u32 header length><header JSON><features><embeddings>``
(little-endian float32, shapes in the header).

A kill while a record is written leaves a torn tail: a short header, a length past the end of the
file, or a checksum that does not match. Reading stops there and the file is cut back to the last
whole record; such a record was never acknowledged (the answer waits for the append and its
fsync), so only unacknowledged changes are lost.

Segments are named by the first LSN they may hold (``00000000000000000042.wal``). A snapshot
starts a new segment at its LSN + 1 and, once the snapshot is on disk, deletes the older ones.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avdata.atomic import fsync_dir

log = logging.getLogger(__name__)
FRAME = struct.Struct("<II")  # payload length, crc32
HEADER_LENGTH = struct.Struct("<I")
SUFFIX = ".wal"


class LogCorrupt(RuntimeError):
    """A record in the middle of the log does not read back (not a torn tail): refuse to guess."""


@dataclass
class Record:
    lsn: int
    op: str  # "upsert" or "delete"
    ids: list[str]
    model: str  # sha256 of the manifest of the model that embedded it
    metadata: list[dict | None] = field(default_factory=list)
    features: np.ndarray | None = None  # (B, D_in) raw features, float32 (upsert only)
    embeddings: np.ndarray | None = None  # (B, E) float32 (upsert only)

    def encode(self) -> bytes:
        arrays = [a for a in (self.features, self.embeddings) if a is not None]
        header = {
            "lsn": self.lsn,
            "op": self.op,
            "ids": self.ids,
            "model": self.model,
            "metadata": self.metadata,
            "shapes": [list(a.shape) for a in arrays],
        }
        head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        payload = b"".join([HEADER_LENGTH.pack(len(head)), head, *(np.ascontiguousarray(a, "<f4").tobytes() for a in arrays)])
        return FRAME.pack(len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> "Record":
        (n,) = HEADER_LENGTH.unpack_from(payload)
        header = json.loads(payload[4 : 4 + n])
        offset, arrays = 4 + n, []
        for shape in header["shapes"]:
            size = int(np.prod(shape)) * 4
            arrays.append(np.frombuffer(payload, "<f4", size // 4, offset).reshape(shape))
            offset += size
        features, embeddings = (arrays + [None, None])[:2]
        return cls(header["lsn"], header["op"], header["ids"], header["model"], header["metadata"], features, embeddings)


def read_segment(path: Path) -> tuple[list[Record], int, bool]:
    """The whole records of one segment, the offset after the last one, and whether a torn tail follows."""
    blob = path.read_bytes()
    records, offset = [], 0
    while offset < len(blob):
        if offset + FRAME.size > len(blob):
            return records, offset, True
        length, checksum = FRAME.unpack_from(blob, offset)
        payload = blob[offset + FRAME.size : offset + FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != checksum:
            return records, offset, True
        try:
            records.append(Record.decode(payload))
        except (ValueError, KeyError, TypeError, struct.error) as err:  # checksum right, content wrong: a bug, not a tear
            raise LogCorrupt(f"{path}: record at byte {offset} does not decode ({err})") from None
        offset += FRAME.size + length
    return records, offset, False


class WriteAheadLog:
    """Segments in ``directory``; one writer at a time (the modality's commit leader)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._fd: int | None = None
        self.segment: Path | None = None
        self.bytes_since_rotation = 0

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    def recover(self, after_lsn: int) -> list[Record]:
        """Records with an LSN above ``after_lsn`` (the snapshot's), in order; a torn tail is cut off.

        Opens the last segment for appending (or starts one), so call it once, before any append.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        records: list[Record] = []
        segments = self.segments()
        for i, path in enumerate(segments):
            found, end, torn = read_segment(path)
            if torn:
                log.warning("%s: torn record at byte %d dropped (a change cut off by a crash, never acknowledged)", path, end)
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
                if i != len(segments) - 1:
                    log.warning("%s: the tear is not in the last segment; later segments are still read", path)
            records.extend(r for r in found if r.lsn > after_lsn)
        lsns = [r.lsn for r in records]
        if lsns != sorted(set(lsns)):
            raise LogCorrupt(f"{self.directory}: log sequence numbers out of order")
        if segments:
            self._open(segments[-1])
        else:
            self.rotate(max([after_lsn, *lsns]) + 1)
        return records

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the kernel applies the umask
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.segment = fd, path
        self.bytes_since_rotation = os.fstat(fd).st_size

    def rotate(self, first_lsn: int) -> None:
        """Start a new segment for LSNs from ``first_lsn`` on (the caller holds off appends)."""
        path = self.directory / f"{first_lsn:020d}{SUFFIX}"
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

    def drop_before_current(self) -> None:
        """Delete the segments older than the current one (their records are in a snapshot)."""
        for path in self.segments():
            if path != self.segment:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
