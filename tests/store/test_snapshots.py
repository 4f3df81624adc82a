"""Snapshots: taken under concurrent writes they hold every change acknowledged before the request;
listed, downloaded as one tar, deleted; `python -m service restore FILE` brings one back (and is
refused for a served directory, a damaged file, or another model)."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from tests.service.conftest import copy_index, make_client, persisted, wait_ready

REPO = Path(__file__).resolve().parents[2]


def restore_cli(tiny, file: Path, index: Path, model: Path | None = None, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "service", "restore", str(file), "--model", str(model or tiny.model_dir), "--index", str(index), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def one_error_line(out: subprocess.CompletedProcess) -> str:
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    return errors[0]


def test_a_snapshot_under_concurrent_writes_holds_every_acknowledged_change(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    acked: list[str] = []
    stop = threading.Event()
    with make_client(tiny, index_dir) as c:
        wait_ready(c)

        def write(w: int) -> None:
            n = 0
            while not stop.is_set():
                item_id = f"w{w}-{n}"
                modality = "audio" if w % 2 else "visual"
                vector = (features.audio if w % 2 else features.visual)[n % len(features)].tolist()
                assert c.post(f"/v1/items/{modality}", json={"items": [{"id": item_id, "vector": vector, "metadata": {"n": n}}]}).status_code == 200
                acked.append(item_id)
                n += 1

        writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for t in writers:
            t.start()
        while len(acked) < 40:
            pass
        before = list(acked)
        r = c.post("/v1/admin/snapshots", json={})
        stop.set()
        for t in writers:
            t.join()
        assert r.status_code == 201, r.text
        card = r.json()
        listed = c.get("/v1/admin/snapshots").json()["snapshots"]
        assert [s["name"] for s in listed] == [card["name"]] and listed[0]["bytes"] == card["bytes"] > 0
        download = c.get(f"/v1/admin/snapshots/{card['name']}")
        assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
        tar_path = tmp_path / "backup.tar"
        tar_path.write_bytes(download.content)
        assert tar_path.read_bytes() == (tmp_path / "snapshots" / f"{card['name']}.tar").read_bytes()
    assert set(tarfile.open(tar_path).getnames()) >= {"avsearch-snapshot.json", "audio/index.faiss", "visual/items.bin", "visual/snapshot.json"}
    restored = tmp_path / "restored"
    out = restore_cli(tiny, tar_path, restored)
    assert out.returncode == 0 and "restored" in out.stdout, out.stderr
    indexes = {m: persisted(tiny, restored, m) for m in ("audio", "visual")}
    for item_id in before:  # acknowledged before the request: in the snapshot, with its metadata
        modality = "audio" if int(item_id[1]) % 2 else "visual"
        assert indexes[modality].get(item_id).metadata == {"n": int(item_id.split("-")[1])}
    assert {m: len(ix) for m, ix in indexes.items()} == card["items"]
    assert card["items"]["audio"] + card["items"]["visual"] - 2 * len(features) == sum(card["lsn"].values())  # one item per logged change: a point in time


def test_list_download_delete_and_bad_names(tiny, tmp_path):
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir, snapshot_dir=tmp_path / "backups") as c:
        wait_ready(c)
        names = [c.post("/v1/admin/snapshots", json={}).json()["name"] for _ in range(2)]
        assert [s["name"] for s in c.get("/v1/admin/snapshots").json()["snapshots"]] == sorted(names)
        assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == sorted(f"{n}.tar" for n in names)
        assert c.delete(f"/v1/admin/snapshots/{names[0]}").json() == {"deleted": names[0]}
        r = c.get(f"/v1/admin/snapshots/{names[0]}")
        assert r.status_code == 404 and "no snapshot named" in r.json()["detail"]
        assert c.delete(f"/v1/admin/snapshots/{names[0]}").status_code == 404
        for bad in ("..", ".hidden", "a b", "x.tar"):
            r = c.get(f"/v1/admin/snapshots/{bad}")
            assert r.status_code in (404, 422), (bad, r.status_code)  # '..' is normalised away by the client: a 404, never a file outside
        assert c.get("/v1/admin/snapshots/x.tar").status_code == 422
        assert [s["name"] for s in c.get("/v1/admin/snapshots").json()["snapshots"]] == [names[1]]


def test_snapshots_need_the_read_write_key(tiny, tmp_path):
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), api_key="rw", read_api_key="ro") as c:
        wait_ready(c)
        assert c.get("/v1/admin/snapshots", headers={"Authorization": "Bearer ro"}).status_code == 403
        assert c.post("/v1/admin/snapshots", json={}, headers={"Authorization": "Bearer ro"}).status_code == 403
        assert c.get("/v1/admin/snapshots", headers={"Authorization": "Bearer rw"}).status_code == 200


def test_restore_brings_the_snapshot_back_and_drops_later_changes(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        assert c.post("/v1/items/audio", json={"items": [{"id": "kept", "vector": features.audio[1].tolist(), "metadata": {"k": 1}}]}).status_code == 200
        name = c.post("/v1/admin/snapshots", json={}).json()["name"]
        assert c.post("/v1/items/audio", json={"items": [{"id": "later", "vector": features.audio[2].tolist()}]}).status_code == 200
        assert c.delete("/v1/items/audio/kept").status_code == 200
        served = restore_cli(tiny, tmp_path / "snapshots" / f"{name}.tar", index_dir)  # while served: refused
        assert "being served" in one_error_line(served) and "POST /v1/admin/reload" in one_error_line(served)
    out = restore_cli(tiny, tmp_path / "snapshots" / f"{name}.tar", index_dir)
    assert out.returncode == 0, out.stderr
    assert not (index_dir / "wal" / "audio").exists() or not any((index_dir / "wal" / "audio").iterdir())  # the later log is gone with its changes
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        assert c.get("/v1/items/audio/kept").json()["metadata"] == {"k": 1}
        assert c.get("/v1/items/audio/later").status_code == 404
        assert c.post("/v1/items/audio", json={"items": [{"id": "after", "vector": features.audio[3].tolist()}]}).status_code == 200  # the log goes on
    assert "after" in persisted(tiny, index_dir, "audio") and "kept" in persisted(tiny, index_dir, "audio")


def test_restore_refuses_damaged_foreign_and_other_model_files(tiny, tmp_path, features):
    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir) as c:
        wait_ready(c)
        name = c.post("/v1/admin/snapshots", json={}).json()["name"]
    good = (tmp_path / "snapshots" / f"{name}.tar").read_bytes()
    (tmp_path / "torn.tar").write_bytes(good[: len(good) // 2])
    assert "snapshot file" in one_error_line(restore_cli(tiny, tmp_path / "torn.tar", tmp_path / "r1"))
    (tmp_path / "text.tar").write_text("hello")
    assert "not a snapshot file" in one_error_line(restore_cli(tiny, tmp_path / "text.tar", tmp_path / "r2"))
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../outside")
        tar.addfile(info, io.BytesIO(b""))
    (tmp_path / "evil.tar").write_bytes(evil.getvalue())
    assert "unexpected member" in one_error_line(restore_cli(tiny, tmp_path / "evil.tar", tmp_path / "r3"))
    assert not (tmp_path / "outside").exists()
    other = tmp_path / "other-model"
    import shutil, json

    shutil.copytree(tiny.model_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["note"] = "another version"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert "not the configured model" in one_error_line(restore_cli(tiny, tmp_path / "snapshots" / f"{name}.tar", tmp_path / "r4", other))
    assert not any((tmp_path / d).exists() for d in ("r1", "r2", "r3", "r4"))


def test_a_snapshot_whose_forked_writer_fails_answers_503_and_leaves_nothing(tiny, tmp_path, features, monkeypatch):
    """Backups copy the index with the folds' forked writer; a writer that fails (here: a full disk
    in the child) is a 503 naming it, with no partial file, no writer directory, and service going on."""
    import errno

    from index.store import VectorIndex

    def full_disk(index, directory):
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    index_dir = copy_index(tiny, tmp_path / "index")
    with make_client(tiny, index_dir, snapshot_dir=tmp_path / "snaps") as c:
        wait_ready(c)
        monkeypatch.setattr(VectorIndex, "save", full_disk)  # runs in the forked child
        r = c.post("/v1/admin/snapshots", json={})
        assert r.status_code == 503 and "snapshot writer (process None)" not in r.json()["detail"] and "snapshot writer (process " in r.json()["detail"] and "No space left" in r.json()["detail"], r.text
        monkeypatch.undo()
        assert [p.name for p in (tmp_path / "snaps").iterdir()] == [] and not [p.name for p in index_dir.iterdir() if p.name.startswith(".")]
        assert c.post("/v1/items/visual", json={"items": [{"id": "after", "vector": features.visual[0].tolist()}]}).status_code == 200
        assert c.post("/v1/admin/snapshots", json={}).status_code == 201
