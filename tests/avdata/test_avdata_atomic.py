"""Atomic writes give files the mode open() would: 0666 less the umask, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from avdata import atomic
from avdata.atomic import FlushBehind, atomic_file, atomic_write, current_umask
from avdata.features import save_directory
from avdata.synthetic import SyntheticConfig, generate


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # unchanged by the first read


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write(tmp_path / "a.json", "{}")
    with atomic_file(tmp_path / "b.bin") as f:
        f.write(b"x")
    plain = tmp_path / "plain"
    plain.write_text("")  # what open() makes under the same umask
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == mode(plain) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plain"]  # no temp file left


def test_a_feature_directory_is_readable_by_another_user(tmp_path, umask):
    """make-data wrote 0600 files: a container running as uid 10001 could not read them."""
    umask(0o022)
    out = save_directory(generate(SyntheticConfig(n_clips=20, n_classes=2)), tmp_path / "data")
    modes = {p.name: mode(p) for p in out.iterdir()}
    assert set(modes) == {"audio_features.npy", "visual_features.npy", "labels.npy", "split.npy", "ids.txt"}
    assert all(m & stat.S_IROTH for m in modes.values()), modes


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "keep.npy"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as f:
            f.write(b"new, half written")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.npy"]


def test_flush_behind_starts_each_chunk_and_waits_for_the_one_before(tmp_path, monkeypatch):
    """A streamed file's writeback runs behind its writes, two chunks at most, and its bytes are the same."""
    calls = []
    monkeypatch.setattr(atomic, "_sync_range", lambda fd, offset, length, flags: calls.append((offset, length, flags)))
    data = os.urandom(10_000)
    with atomic_file(tmp_path / "big.bin") as f:
        stream = FlushBehind(f, chunk=1000)
        for start in range(0, len(data), 300):
            assert stream.write(data[start : start + 300]) == len(data[start : start + 300])
    assert (tmp_path / "big.bin").read_bytes() == data
    started = [(offset, length) for offset, length, flags in calls if flags == atomic._WRITE]
    waited = [(offset, length) for offset, length, flags in calls if flags == atomic._WAIT_BEFORE | atomic._WRITE | atomic._WAIT_AFTER]
    assert [offset for offset, _ in started] == [0] + [sum(length for _, length in started[:i]) for i in range(1, len(started))]  # back to back
    assert all(length >= 1000 for _, length in started) and sum(length for _, length in started) > len(data) - 1000
    assert waited == started[:-1]  # each chunk on disk before the one after it starts
    assert [c[:2] for c in calls] == [started[0]] + [r for pair in zip(started[1:], waited) for r in pair]  # ...in that order


def test_flush_behind_uses_the_real_call_on_linux(tmp_path):
    if sys.platform.startswith("linux"):
        assert atomic._libc_sync_file_range is not None
    data = os.urandom(3 << 20)
    with atomic_file(tmp_path / "big.bin") as f:
        stream = FlushBehind(f, chunk=256 << 10)
        for start in range(0, len(data), 100_000):
            stream.write(data[start : start + 100_000])
    assert (tmp_path / "big.bin").read_bytes() == data
