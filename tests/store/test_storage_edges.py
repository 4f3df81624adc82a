"""The low items of issue 21 on the storage side: reload roots never default to '/', a manifest
cannot name encoder files outside its model directory, a snapshot answered 201 has its directory
entry fsynced, the listing skips foreign files instead of answering 500, restore has a size cap."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from index.embedder import Embedder, ModelError
from store.layout import CARD_NAME
from service.settings import Settings
from tests.service.conftest import copy_index, make_client, wait_ready
from tests.store.test_snapshots import one_error_line, restore_cli


def test_reload_roots_never_default_to_the_filesystem_root(tmp_path):
    roots = Settings(model_dir=Path("/model"), index_dir=tmp_path / "indexes" / "current").reload_root_paths()
    assert Path("/") not in roots and Path("/model") in roots and (tmp_path / "indexes").resolve() in roots
    assert Path("/") in Settings(reload_roots="/").reload_root_paths()  # asked for explicitly: the operator's choice


@pytest.mark.parametrize("name", ["../visual_encoder.onnx", "/etc/hostname", "sub/../../x.onnx"])
def test_a_manifest_naming_files_outside_the_model_directory_is_refused(tiny, tmp_path, name):
    import shutil

    model = Path(shutil.copytree(tiny.model_dir, tmp_path / "model"))
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"]["audio"] = name
    (model / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="outside the model directory"):
        Embedder(model, device="cpu")


def test_a_snapshot_is_in_its_directory_for_good_before_the_201(tiny, tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    snapshots = tmp_path / "snapshots"
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), snapshot_dir=snapshots) as c:
        wait_ready(c)
        synced.clear()
        r = c.post("/v1/admin/snapshots", json={})
        assert r.status_code == 201
    tar = str(snapshots / f"{r.json()['name']}.tar")
    renamed = max(i for i, path in enumerate(synced) if path.endswith("snapshot.tar") or path == tar)  # the file itself, before its rename
    assert str(snapshots.resolve()) in synced[renamed + 1 :], synced[renamed:]  # then the directory holding its new name


def _tar(path: Path, card: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(CARD_NAME)
        info.size = len(card)
        tar.addfile(info, io.BytesIO(card))


def test_the_listing_skips_foreign_files(tiny, tmp_path):
    snapshots = tmp_path / "snapshots"
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), snapshot_dir=snapshots) as c:
        wait_ready(c)
        name = c.post("/v1/admin/snapshots", json={}).json()["name"]
        _tar(snapshots / "a-list.tar", b"[1, 2]")
        _tar(snapshots / "missing-fields.tar", json.dumps({"model": "x"}).encode())
        _tar(snapshots / "wrong-types.tar", json.dumps({"model": 1, "model_sha256": [], "created": "yesterday", "lsn": 3, "items": None}).encode())
        _tar(snapshots / "binary.tar", b"\xff\xfe\x00")
        (snapshots / "a-directory.tar").mkdir()
        r = c.get("/v1/admin/snapshots")
        assert r.status_code == 200 and [s["name"] for s in r.json()["snapshots"]] == [name], r.text


def test_restore_refuses_a_file_past_its_size_cap(tiny, tmp_path):
    snapshots = tmp_path / "snapshots"
    with make_client(tiny, copy_index(tiny, tmp_path / "index"), snapshot_dir=snapshots) as c:
        wait_ready(c)
        name = c.post("/v1/admin/snapshots", json={}).json()["name"]
    file = snapshots / f"{name}.tar"
    target = tmp_path / "restored"
    out = restore_cli(tiny, file, target, extra=["--max-bytes", "1000"])
    line = one_error_line(out)
    assert "more than --max-bytes 1000" in line and not target.exists()
    assert restore_cli(tiny, file, target).returncode == 0  # the default cap holds a real snapshot
