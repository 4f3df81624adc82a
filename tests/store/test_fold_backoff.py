"""Failed folds back off exponentially instead of retrying every second (each try forks and writes
the whole index: on a full disk, that refills it), and folds are visible in the metrics: count by
outcome, duration, the log bytes waiting, commit group sizes (issue 21, item 6)."""

from __future__ import annotations

import re
import time

import store.checkpoints
from store.collection import Collection
from store.config import StoreConfig
from tests.service.conftest import copy_index, make_client, wait_ready


def _no_space(calls: list[float]):
    def save(*args, **kwargs):
        calls.append(time.monotonic())
        raise OSError(28, "No space left on device")

    return save


def test_failed_folds_back_off(tiny, tmp_path, features, monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(store.checkpoints, "save_atomically", _no_space(calls))
    collection = Collection.load(tiny.model_dir, copy_index(tiny, tmp_path / "index"), device="cpu", config=StoreConfig(checkpoint_bytes=1, checkpoint_growth=0, fork=False))
    try:
        started = time.monotonic()
        while time.monotonic() - started < 7.5:  # writes keep nudging the snapshotter
            collection.upsert("visual", features.visual[:1], ["x"], [None])
            time.sleep(0.1)
    finally:
        collection.close()
    gaps = [round(b - a, 1) for a, b in zip(calls, calls[1:])]
    print(f"\nfailed folds in 7.5 s of writes: {len(calls)} tries, {gaps} s apart")
    assert 2 <= len(calls) <= 4 and all(later >= 1.8 * earlier for earlier, later in zip(gaps, gaps[1:])), gaps  # 1 s, 2 s, 4 s...


def _metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{selector}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name}{{{selector}}} not in /metrics"
    return float(found.group(1))


def test_folds_are_in_the_metrics(tiny, tmp_path, features, monkeypatch):
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), wal_snapshot_bytes=2**30, wal_snapshot_seconds=3600) as c:
        wait_ready(c)
        collection = c.app.state.avsearch.collection
        for i in range(3):
            assert c.post("/v1/items/visual", json={"items": [{"id": f"m{i}", "vector": features.visual[i].tolist()}]}).status_code == 200
        text = c.get("/metrics").text
        assert _metric(text, "avsearch_commit_group_changes_count", modality="visual") == 3
        waiting = _metric(text, "avsearch_log_bytes", modality="visual")
        assert waiting == collection.shards["visual"].wal.bytes_since_rotation > 0
        monkeypatch.setattr(store.checkpoints, "save_atomically", _no_space([]))
        try:
            collection.checkpointer.checkpoint("visual")
        except OSError:
            pass
        monkeypatch.undo()
        collection.checkpointer.checkpoint("visual")
        text = c.get("/metrics").text
        assert _metric(text, "avsearch_folds_total", modality="visual", outcome="failed") == 1
        assert _metric(text, "avsearch_folds_total", modality="visual", outcome="done") == 1
        assert _metric(text, "avsearch_fold_duration_seconds_count", modality="visual") == 2
        assert _metric(text, "avsearch_fold_log_bytes_sum", modality="visual") >= waiting
        assert _metric(text, "avsearch_log_bytes", modality="visual") == 0
