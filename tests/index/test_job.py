"""The batch indexing job: resumable after a crash or a kill, idempotent, shard folders, Ray, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from index.__main__ import main
from index.build import build_job
from index.embedder import Embedder
from index.job import read_shard
from index.store import VectorIndex
from training.data import load_features

REPO = Path(__file__).resolve().parents[2]


def _index_files(out: Path) -> dict[str, bytes]:
    return {f"{m}/{name}": (out / m / name).read_bytes() for m in ("audio", "visual") for name in ("index.faiss", "items.bin")}


class Crash(RuntimeError):
    pass


def test_crashed_job_resumes_to_the_same_index(tiny, tmp_path):
    reference = build_job(tiny.model_dir, tiny.data_dir, tmp_path / "ref", partition_rows=50, progress=False)
    assert reference.embedded == reference.partitions == 24 and reference.items == {"audio": 600, "visual": 600}

    done = []

    def crash_after_five(modality: str, partition: str) -> None:
        done.append((modality, partition))
        if len(done) == 5:
            raise Crash("injected failure")

    with pytest.raises(Crash):
        build_job(tiny.model_dir, tiny.data_dir, tmp_path / "job", partition_rows=50, progress=False, on_partition=crash_after_five)
    assert not (tmp_path / "job" / "audio" / "info.json").exists()
    resumed = build_job(tiny.model_dir, tiny.data_dir, tmp_path / "job", partition_rows=50, progress=False)
    assert (resumed.skipped, resumed.embedded) == (5, 19)
    assert _index_files(tmp_path / "job") == _index_files(tmp_path / "ref")

    again = build_job(tiny.model_dir, tiny.data_dir, tmp_path / "job", partition_rows=50, progress=False)  # idempotent
    assert (again.skipped, again.embedded) == (24, 0)
    assert _index_files(tmp_path / "job") == _index_files(tmp_path / "ref")


def _cli(data: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "index", "build", "--model", str(model), "--data", str(data), "--out", str(out), "--no-progress", *extra]


def test_killed_job_restarts_to_the_same_index(tiny, tmp_path):
    """SIGKILL the CLI after a few partitions are written, restart it, compare with an uninterrupted run."""
    args = ("--partition-rows", "3")  # 400 small partitions: the job runs long enough to be killed
    subprocess.run(_cli(tiny.data_dir, tiny.model_dir, tmp_path / "ref"), check=True, capture_output=True, cwd=REPO)
    proc = subprocess.Popen(_cli(tiny.data_dir, tiny.model_dir, tmp_path / "job", *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "job" / "embeddings" / "audio"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and len(list(shards.glob("*.npz"))) < 5:
        time.sleep(0.002)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "job" / "embeddings").rglob("*.npz")))
    assert 5 <= written < 400 and not (tmp_path / "job" / "visual" / "info.json").exists()

    out = subprocess.run(_cli(tiny.data_dir, tiny.model_dir, tmp_path / "job", *args), capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert f"({400 - written} embedded now, {written} already done)" in out.stdout
    for modality in ("audio", "visual"):  # different partitioning, same vectors, same ids, same order
        ref, got = VectorIndex.load(tmp_path / "ref" / modality), VectorIndex.load(tmp_path / "job" / modality)
        assert got.ids() == ref.ids()
        np.testing.assert_allclose(got.get("clip-000123").vector, ref.get("clip-000123").vector, atol=1e-6)
        queries = np.stack([ref.get(i).vector for i in ref.ids()[:20]])
        assert got.search(queries, 10)[1] == ref.search(queries, 10)[1]


def _write_shards(tiny, folder: Path) -> None:
    """The tiny collection as 3 shards; visual only in two of them; ids and metadata in one."""
    data = load_features(tiny.data_dir)
    folder.mkdir()
    for s, rows in enumerate(np.array_split(np.arange(len(data)), 3)):
        np.save(folder / f"audio_features-s{s}.npy", data.audio[rows])
        if s < 2:
            np.save(folder / f"visual_features-s{s}.npy", (data.visual[rows] * 256 + 128).clip(0, 255).astype(np.uint8))
    (folder / "ids-s0.txt").write_text("\n".join(data.ids[:200]) + "\n")
    (folder / "metadata-s0.jsonl").write_text("\n".join(json.dumps({"title": f"clip {i}"}) for i in range(200)) + "\n")


def test_shard_folder_job_and_ivf(tiny, tmp_path):
    _write_shards(tiny, tmp_path / "shards")
    summary = build_job(tiny.model_dir, tmp_path / "shards", tmp_path / "out", "IVF8,Flat", progress=False, search_params={"nprobe": 8})
    assert summary.partitions == 5 and summary.items == {"audio": 600, "visual": 400}
    audio = VectorIndex.load(tmp_path / "out" / "audio")
    assert audio.info["factory"] == "IVF8,Flat" and audio.info["search_params"] == {"nprobe": 8}
    assert audio.get(load_features(tiny.data_dir).ids[7]).metadata == {"title": "clip 7"}
    assert "s1:0" in audio and "s2:199" in audio and "s2:0" not in VectorIndex.load(tmp_path / "out" / "visual")
    embedder = Embedder(tiny.model_dir, device="cpu")
    x = np.load(tmp_path / "shards" / "audio_features-s2.npy")[:5]
    _, ids = audio.search(embedder.embed("audio", x), 1)  # nprobe = nlist: exact; each finds itself
    assert [row[0] for row in ids] == [f"s2:{i}" for i in range(5)]


def test_ray_engine_matches_local(tiny, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = build_job(tiny.model_dir, tiny.data_dir, tmp_path / "ray", engine="ray", partition_rows=200, workers=1, progress=False)
    finally:
        ray.shutdown()
    assert summary.embedded == 6 and summary.items == {"audio": 600, "visual": 600}
    local = build_job(tiny.model_dir, tiny.data_dir, tmp_path / "local", partition_rows=200, progress=False)
    for modality in ("audio", "visual"):
        for shard in sorted((tmp_path / "local" / "embeddings" / modality).glob("*.npz")):
            (want, want_ids, _), (got, got_ids, _) = read_shard(shard), read_shard(tmp_path / "ray" / "embeddings" / modality / shard.name)
            assert got_ids == want_ids and len(got_ids) == 200
            np.testing.assert_allclose(got, want, atol=1e-6)
    assert local.embedded == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--factory", "IVF4096x,Flat"], "not a FAISS factory string"),
        (["--engine", "ray", "--workers", "0"], "must be ≥ 1"),
        (["--build-param", "efConstruction=100"], "does not apply to a 'Flat' index"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tiny, tmp_path, capsys, extra, message):
    code = main(["build", "--model", str(tiny.model_dir), "--data", str(tiny.data_dir), "--out", str(tmp_path / "o"), "--no-progress", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "o" / "audio").exists()


def test_cli_refuses_missing_data_and_another_jobs_directory(tiny, tmp_path, capsys):
    base = ["build", "--model", str(tiny.model_dir), "--no-progress"]
    assert main([*base, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--data", str(tiny.data_dir), "--out", str(tmp_path / "o"), "--partition-rows", "300"]) == 0
    assert main([*base, "--data", str(tiny.data_dir), "--out", str(tmp_path / "o"), "--partition-rows", "100"]) == 2
    assert "another model or collection" in capsys.readouterr().err.splitlines()[-1]


def test_the_same_folder_with_other_features_is_refused(tiny, tmp_path, capsys):
    """Same row counts and partition names, other features: the old embeddings must not be reused."""
    import shutil

    data = shutil.copytree(tiny.data_dir, tmp_path / "data")
    base = ["build", "--model", str(tiny.model_dir), "--no-progress", "--data", str(data), "--out", str(tmp_path / "o")]
    assert main(base) == 0
    capsys.readouterr()
    audio = np.load(data / "audio_features.npy")
    np.save(data / "audio_features.npy", audio[::-1].copy())
    assert main(base) == 2
    assert "source_sha256 differs" in capsys.readouterr().err


def test_training_sample_grows_with_the_ivf_lists(tmp_path):
    from index.job import ROWS_PER_LIST, TRAIN_SAMPLE, _check_factory, _training_sample

    assert _check_factory("Flat", 10) == 0 and _check_factory("HNSW32", 10) == 0
    assert _check_factory("PQ5", 10) == TRAIN_SAMPLE and _check_factory("IVF64,Flat", 10) == TRAIN_SAMPLE
    assert _check_factory("IVF65536_HNSW32,PQ5", 10) == ROWS_PER_LIST * 65536 > TRAIN_SAMPLE
    rows = [3000, 1000]
    paths = []
    for n, rows_n in enumerate(rows):
        path = tmp_path / f"{n}.npz"
        np.savez(path, embeddings=np.full((rows_n, 4), n, np.float32), ids=np.array([f"{n}:{i}" for i in range(rows_n)]), metadata=np.array("[]"))
        paths.append(path)
    sample = _training_sample(paths, rows, 400)
    assert len(sample) == 400 and (sample[:, 0] == 0).sum() == 300  # in proportion to partition size
    assert len(_training_sample(paths, rows, 10_000)) == 4000  # everything when the collection is small


def test_embedding_shards_keep_any_id_and_old_shards_still_read(tmp_path):
    from index.job import embed_partition
    from index.sources import Chunk

    class OneChunk:
        def read(self, partition, modality):
            return Chunk(np.ones((3, 2), np.float32), ["a", "ü-日本", "x y\x00z"], [{"t": 1}, None, None])

    class Identity:
        def embed(self, modality, x):
            return x

    embed_partition(Identity(), OneChunk(), "p0", "audio", tmp_path, batch_size=2)
    vectors, ids, metadata = read_shard(tmp_path / "embeddings" / "audio" / "p0.npz")
    assert ids == ["a", "ü-日本", "x y\x00z"] and metadata == [{"t": 1}, None, None] and vectors.shape == (3, 2)
    np.savez(tmp_path / "old.npz", embeddings=vectors, ids=np.array(["a", "b", "c"]), metadata=np.array("null"))  # the earlier layout
    assert read_shard(tmp_path / "old.npz")[1:] == (["a", "b", "c"], None)
