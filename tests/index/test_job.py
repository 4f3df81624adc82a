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
from index.job import DuplicateIdError, JobError, read_shard
from index.store import VectorIndex
from avdata.features import load_features

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
    import ray  # a dev dependency (make test installs it): missing, this fails rather than skips
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


def _shards_with_ids(tiny, folder: Path, ids_per_shard: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """A shard folder with the given ids (audio only; rows from the tiny data); returns each id's features by place."""
    data = load_features(tiny.data_dir)
    folder.mkdir()
    start, rows = 0, {}
    for name, ids in ids_per_shard.items():
        features = data.audio[start : start + len(ids)]
        np.save(folder / f"audio_features-{name}.npy", features)
        (folder / f"ids-{name}.txt").write_text("\n".join(ids) + "\n")
        (folder / f"metadata-{name}.jsonl").write_text("\n".join(json.dumps({"from": f"{name}:{r}"}) for r in range(len(ids))) + "\n")
        rows.update({f"{name}:{r}": features[r] for r in range(len(ids))})
        start += len(ids)
    return rows


def test_an_id_repeated_across_partitions_is_refused_naming_both_places(tiny, tmp_path, capsys):
    """6 rows, one id in two shards: once merged into 5 items without a word."""
    _shards_with_ids(tiny, tmp_path / "shards", {"s0": ["a", "b", "dup"], "s1": ["c", "dup", "d"]})
    args = ["build", "--model", str(tiny.model_dir), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error")] == [err[-1]] and "Traceback" not in "\n".join(err)  # one line (after INFO logs)
    assert err[-1].startswith("error: id 'dup' occurs twice in the audio collection: partition 's0' row 2 and partition 's1' row 1;"), err[-1]
    assert "--on-duplicate last-wins" in err[-1] and not (tmp_path / "o" / "audio").exists()
    with pytest.raises(DuplicateIdError, match="'dup' occurs twice"):
        build_job(tiny.model_dir, tmp_path / "shards", tmp_path / "o", progress=False)


def test_an_id_repeated_inside_one_partition_is_refused_naming_both_rows(tiny, tmp_path):
    _shards_with_ids(tiny, tmp_path / "shards", {"s0": ["a", "b"], "s1": ["x", "c", "x", "d"]})
    with pytest.raises(DuplicateIdError, match=r"'x' occurs twice in the audio collection: partition 's1' row 0 and partition 's1' row 2;"):
        build_job(tiny.model_dir, tmp_path / "shards", tmp_path / "o", progress=False)


def test_last_wins_keeps_the_later_row_and_counts_the_replaced(tiny, tmp_path, capsys):
    places = _shards_with_ids(tiny, tmp_path / "shards", {"s0": ["a", "dup", "x"], "s1": ["x", "b"], "s2": ["dup", "c", "dup"]})
    out = tmp_path / "o"
    assert main(["build", "--model", str(tiny.model_dir), "--data", str(tmp_path / "shards"), "--out", str(out), "--no-progress"]) == 2
    capsys.readouterr()
    summary = build_job(tiny.model_dir, tmp_path / "shards", out, progress=False, on_duplicate="last-wins")
    assert summary.embedded == 0 and summary.skipped == 3  # the refused run's embeddings are reused
    assert summary.items == {"audio": 5} and summary.replaced == {"audio": 3}  # 8 rows: dup twice and x once replaced
    assert "duplicates: audio 3 rows replaced by a later row with the same id (last wins)" in summary.lines()
    index = VectorIndex.load(out / "audio")
    assert sorted(index.ids()) == ["a", "b", "c", "dup", "x"]
    embedder = Embedder(tiny.model_dir, device="cpu")
    for item_id, place in (("dup", "s2:2"), ("x", "s1:0"), ("a", "s0:0")):
        assert index.get(item_id).metadata == {"from": place}
        np.testing.assert_allclose(index.get(item_id).vector, embedder.embed("audio", places[place][None])[0], atol=1e-6)
    args = ["build", "--model", str(tiny.model_dir), "--data", str(tmp_path / "shards"), "--out", str(out), "--no-progress", "--on-duplicate", "last-wins"]
    assert main(args) == 0
    assert "duplicates: audio 3 rows replaced" in capsys.readouterr().out
    with pytest.raises(JobError, match="unknown on_duplicate 'first-wins'"):
        build_job(tiny.model_dir, tmp_path / "shards", out, progress=False, on_duplicate="first-wins")


def test_a_refused_duplicate_is_found_by_the_upserts_own_lookup(tmp_path):
    """No second id lookup per partition (10^8 items): a refused run and a clean one call labels_of alike, i.e. never."""
    from index.items import ItemTable
    from index.job import ON_DUPLICATE, _index_from_shards, write_shard
    from index.sources import Partition

    rng = np.random.default_rng(0)
    parts = []
    for name, ids in (("p0", ["a", "b"]), ("p1", ["c", "a"])):
        write_shard(tmp_path / "embeddings" / "visual" / f"{name}.npz", rng.standard_normal((2, 4)).astype(np.float32), ids, None)
        parts.append(Partition(name, 2))
    calls = []
    original = ItemTable.labels_of
    ItemTable.labels_of = lambda self, ids: calls.append(ids) or original(self, ids)
    try:
        with pytest.raises(DuplicateIdError, match="partition 'p0' row 0 and partition 'p1' row 1"):
            _index_from_shards(tmp_path, "visual", parts, "Flat", 4, "h", None, None, ON_DUPLICATE[0])
        index, replaced = _index_from_shards(tmp_path, "visual", parts, "Flat", 4, "h", None, None, "last-wins")
    finally:
        ItemTable.labels_of = original
    assert calls == [] and replaced == 1 and len(index) == 3
