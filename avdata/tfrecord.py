"""TFRecord files of ``tf.train.Example`` / ``SequenceExample`` records, read without TensorFlow.

A TFRecord file (plain, or gzip as a whole) is a run of records, each framed as::

    uint64 length | uint32 masked CRC-32C of the 8 length bytes | data | uint32 masked CRC-32C of data

Every record's length and both checksums are verified: one flipped byte would otherwise silently
change a float (the ``tfrecord`` package on PyPI reads without checking them). CRC-32C comes from
the ``crc32c`` wheel (hardware instructions, ~10 GB/s); :func:`masked_crc` applies TensorFlow's mask.

The records are protobuf messages, decoded here from the wire format (six message types, no
generated code): an ``Example`` is ``features`` (field 1) only; a ``SequenceExample`` is
``context`` (field 1, the same ``Features`` message) plus ``feature_lists`` (field 2). So one
decoder reads both, and a record says itself which it is. Float lists come back as float32 arrays
viewed on the record's bytes (packed, as TensorFlow writes them; unpacked is read too).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from avdata.paired import DataError

__all__ = ["MASK_DELTA", "masked_crc", "read_tfrecord", "looks_like_tfrecord", "Record", "parse_record", "is_gzip"]

MASK_DELTA = 0xA282EAD8  # TensorFlow's crc32c mask: rotate right by 15, add this
_HEADER = struct.Struct("<QI")


def masked_crc(data: bytes | memoryview) -> int:
    import crc32c  # a compiled wheel; imported when a TFRecord is read

    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _file_bytes(path: str | os.PathLike) -> bytes:
    """The whole shard, un-gzipped when it is gzip (one shard at a time is the memory bound)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: a gzip TFRecord that does not decompress ({err}); the file is truncated or corrupt") from None
    return blob


def read_tfrecord(path: str | os.PathLike, bad: list[str] | None = None) -> Iterator[tuple[int, memoryview]]:
    """(record number, record bytes) for every record, after checking its framing and both CRCs.

    A problem raises :class:`DataError` naming the file and the record; with a ``bad`` list it is
    appended there instead: a record with a bad data CRC is skipped, and a bad length (whose
    CRC fails, or that runs past the end) ends the file, since no later record can be found.
    """

    def problem(message: str) -> None:
        if bad is None:
            raise DataError(message)
        bad.append(message)

    try:
        blob = _file_bytes(path)
    except DataError as err:
        return problem(str(err))
    view, pos, number, end = memoryview(blob), 0, 0, len(blob)
    while pos < end:
        if end - pos < _HEADER.size:
            return problem(f"{path}: record {number}: truncated header ({end - pos} of 12 bytes); the file is cut short")
        length, length_crc = _HEADER.unpack_from(blob, pos)
        if masked_crc(view[pos : pos + 8]) != length_crc:
            return problem(f"{path}: record {number}: length CRC mismatch at byte {pos}; the file is corrupt (or not a TFRecord)")
        start = pos + _HEADER.size
        if end - start < length + 4:
            return problem(f"{path}: record {number}: truncated ({end - start} bytes left of {length} + 4); the file is cut short")
        (data_crc,) = struct.unpack_from("<I", blob, start + length)
        data = view[start : start + length]
        if masked_crc(data) == data_crc:
            yield number, data
        else:
            problem(f"{path}: record {number}: data CRC mismatch (bytes {start}..{start + length}); the record is corrupt")
        pos, number = start + length + 4, number + 1


def looks_like_tfrecord(path: str | os.PathLike) -> bool:
    """Whether the file's first record header passes its CRC (the detection rule's test)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size) if not is_gzip(path) else gzip.GzipFile(fileobj=f).read(_HEADER.size)
    except (OSError, EOFError, zlib.error):
        return False
    return len(head) == _HEADER.size and masked_crc(head[:8]) == struct.unpack_from("<I", head, 8)[0]


# --- protobuf wire format ----------------------------------------------------------------------


class _WireError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError("varint longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field in ``buf[pos:end]``; for
    length-delimited fields (wire type 2) the value is the start of their bytes."""
    while pos < end:
        key = buf[pos]  # one-byte keys and lengths (< 128) are the common case: no call for them
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, 0, value, pos
        elif wire == 2:
            length = buf[pos]
            if length < 0x80:
                pos += 1
            else:
                length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _WireError("a field runs past the end of its message")
            yield number, 2, pos, pos + length
            pos += length
        elif wire == 5:
            yield number, 5, pos, pos + 4
            pos += 4
        elif wire == 1:
            yield number, 1, pos, pos + 8
            pos += 8
        else:
            raise _WireError(f"unsupported wire type {wire}")
    if pos != end:
        raise _WireError("a field runs past the end of its message")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _one_bytes_value(buf: bytes, pos: int, end: int) -> bytes | None:
    """The value of a ``Feature`` that is a bytes_list of exactly one string (one 8-bit frame: the
    bulk of a frame-level record), read without the general loop; None for any other Feature."""
    if buf[pos] != 0x0A:  # field 1 (bytes_list), length-delimited
        return None
    _, inner = _varint(buf, pos + 1)
    if inner >= end or buf[inner] != 0x0A:  # BytesList.value
        return None
    length, start = _varint(buf, inner + 1)
    return buf[start : start + length] if start + length == end else None


def _feature(buf: bytes, pos: int, end: int):
    """One ``Feature``: list[bytes] (bytes_list), float32 array (float_list) or list[int] (int64_list)."""
    if pos < end:
        value = _one_bytes_value(buf, pos, end)
        if value is not None:
            return [value]
    for kind, wire, start, stop in _fields(buf, pos, end):
        if wire != 2:
            raise _WireError(f"Feature field {kind} has wire type {wire}")
        if kind == 1:  # BytesList: repeated bytes value = 1
            return [bytes(buf[a:b]) for n, w, a, b in _fields(buf, start, stop) if n == 1 and w == 2]
        if kind == 2:  # FloatList: repeated float value = 1 (packed, or one fixed32 per value)
            parts = []
            for n, w, a, b in _fields(buf, start, stop):
                if n == 1 and w == 2:
                    if (b - a) % 4:
                        raise _WireError("a packed float list whose length is not a multiple of 4")
                    parts.append(np.frombuffer(buf, "<f4", (b - a) // 4, a))
                elif n == 1 and w == 5:
                    parts.append(np.frombuffer(buf, "<f4", 1, a))
            return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if kind == 3:  # Int64List: repeated int64 value = 1 (packed varints, or one varint per value)
            values = []
            for n, w, a, b in _fields(buf, start, stop):
                if n == 1 and w == 2:
                    while a < b:
                        v, a = _varint(buf, a)
                        values.append(_signed(v))
                elif n == 1 and w == 0:
                    values.append(_signed(a))
            return values
    return []  # a Feature with no kind set: an empty list


def _features(buf: bytes, pos: int, end: int) -> dict:
    """A ``Features`` message: map<string, Feature> (entries: key = 1, value = 2)."""
    out = {}
    for n, w, start, stop in _fields(buf, pos, end):
        if n != 1 or w != 2:
            continue
        key, value = None, []
        for m, v, a, b in _fields(buf, start, stop):
            if m == 1 and v == 2:
                key = bytes(buf[a:b]).decode()
            elif m == 2 and v == 2:
                value = _feature(buf, a, b)
        if key is not None:
            out[key] = value
    return out


def _feature_lists(buf: bytes, pos: int, end: int) -> dict:
    """A ``FeatureLists`` message: map<string, FeatureList>, a FeatureList being repeated Feature (field 1)."""
    out = {}
    for n, w, start, stop in _fields(buf, pos, end):
        if n != 1 or w != 2:
            continue
        key, frames = None, []
        for m, v, a, b in _fields(buf, start, stop):
            if m == 1 and v == 2:
                key = bytes(buf[a:b]).decode()
            elif m == 2 and v == 2:
                frames = [_feature(buf, fa, fb) for k, fw, fa, fb in _fields(buf, a, b) if k == 1 and fw == 2]
        if key is not None:
            out[key] = frames
    return out


@dataclass
class Record:
    """One decoded record: an ``Example`` has ``context`` only; a ``SequenceExample`` also ``frames``."""

    context: dict = field(default_factory=dict)  # name -> list[bytes] | float32 array | list[int]
    frames: dict = field(default_factory=dict)  # name -> one such value per time step (per second)


def parse_record(data: bytes | memoryview) -> Record:
    """Decode an ``Example`` or a ``SequenceExample``; raises ValueError when the bytes are neither."""
    buf = bytes(data)
    record = Record()
    try:
        for n, w, start, stop in _fields(buf, 0, len(buf)):
            if n == 1 and w == 2:
                record.context.update(_features(buf, start, stop))
            elif n == 2 and w == 2:
                record.frames.update(_feature_lists(buf, start, stop))
    except (_WireError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"not a tf.train.Example or SequenceExample ({err or 'cut short'})") from None
    return record
