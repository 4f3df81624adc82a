"""Benchmark of the formats people hold: reader speed, the index job at 10^6 clips, training memory.

    python bench/formats_bench.py                   # ~30 min on 2 shared cores, ~20 GB of disk in --work
    python bench/formats_bench.py --quick           # small sizes, a minute

Writes bench/results/formats_bench.json and .md. The same clips (1,024-d visual, 128-d audio, the
YouTube-8M widths) are written as

* YouTube-8M video-level TFRecords (``Example``: ``id``, ``labels``, ``mean_rgb``, ``mean_audio``),
* YouTube-8M frame-level TFRecords (``SequenceExample``, ``--frames`` 8-bit frames per clip),
* Parquet (fixed-size-list float32 columns, an id, a title and labels),
* ``.npy`` shards (float32; the baseline),

with the independent test writers (tests/avdata/writers.py; framing CRCs from the ``crc32c`` wheel,
which the tests check against a bitwise CRC). Three parts:

1. **readers**: clips/s of ``Collection.read_all`` (CRC checks, decoding, pooling) with 1 and 2
   processes, beside the ``.npy`` shard folder's ``load_shard_folder`` (page cache warm for all);
2. **index job**: ``python -m index build`` wall time and peak RSS (``wait4``) for ``--index-clips``
   clips from each of video-level TFRecords, Parquet and ``.npy`` shards, and the peak at a quarter
   of that size: the per-clip slope extrapolates the peak to 10^7 clips;
3. **training memory**: ``python -m training train --config tiny`` peak RSS on uint8 feature
   directories of ``--train-clips`` sizes (kept 8-bit in memory), the fitted bytes per clip and
   the prediction for YouTube-8M's 6.1 M video-level clips.

Ratios are measured in one run, beside the absolute figures; the machine is shared, so absolute
times are noisy. The model is the ``tiny`` preset trained on the synthetic default (its embedding
cost is small: the figures show the data path, not the encoder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from avdata.collection import open_collection  # noqa: E402
from avdata.features import load_shard_folder  # noqa: E402
from avdata.tfrecord import masked_crc  # noqa: E402
from tests.avdata.writers import bytes_feature, example, field_bytes, int64_feature, sequence_example, write_tfrecord  # noqa: E402

RESULTS = REPO / "bench" / "results"
D_V, D_A = 1024, 128
YT8M_CLIPS = 6_100_000
PY = sys.executable


def _floats(vector: np.ndarray) -> bytes:
    """Feature.float_list, packed: the writer's encoding, with the floats as bytes in one go."""
    return field_bytes(2, field_bytes(1, vector.astype("<f4").tobytes()))


def _clip_codes(start: int, n: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, frames, D_v) and (n, frames, D_a) uint8 frames of clips start..start+n (seeded by position)."""
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (n, frames, D_V), dtype=np.uint8), rng.integers(0, 256, (n, frames, D_A), dtype=np.uint8)


def _dequantize(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.float32(4 / 255) + np.float32(4 / 512 - 2)


def write_collections(root: Path, n: int, shards: int, frames: int, kinds: tuple[str, ...]) -> dict[str, Path]:
    """The same n clips in each of ``kinds`` (video, frame, parquet, npy), ``shards`` files each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {k: root / k for k in kinds}
    if all((p / "DONE.txt").is_file() for p in out.values()):
        return out
    for p in out.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rgb, audio = _clip_codes(int(a), int(b - a), frames)
        mean_rgb, mean_audio = _dequantize(rgb).mean(1), _dequantize(audio).mean(1)
        ids = [f"v{i:08d}" for i in range(a, b)]
        labels = [[i % 3862, (i * 7) % 3862] for i in range(a, b)]
        if "video" in out:
            records = [
                example({"id": bytes_feature([ids[i].encode()]), "labels": int64_feature(labels[i]), "mean_rgb": _floats(mean_rgb[i]), "mean_audio": _floats(mean_audio[i])})
                for i in range(b - a)
            ]
            write_tfrecord(out["video"] / f"train{s:04d}.tfrecord", records, crc=masked_crc)
        if "frame" in out:
            records = [
                sequence_example(
                    {"id": bytes_feature([ids[i].encode()]), "labels": int64_feature(labels[i])},
                    {"rgb": [bytes_feature([f.tobytes()]) for f in rgb[i]], "audio": [bytes_feature([f.tobytes()]) for f in audio[i]]},
                )
                for i in range(b - a)
            ]
            write_tfrecord(out["frame"] / f"train{s:04d}.tfrecord", records, crc=masked_crc)
        if "parquet" in out:
            table = pa.table(
                {
                    "id": ids,
                    "title": [f"clip {i}" for i in range(a, b)],
                    "labels": pa.array(labels, pa.list_(pa.int64())),
                    "audio": pa.FixedSizeListArray.from_arrays(pa.array(mean_audio.reshape(-1)), D_A),
                    "visual": pa.FixedSizeListArray.from_arrays(pa.array(mean_rgb.reshape(-1)), D_V),
                }
            )
            pq.write_table(table, out["parquet"] / f"part{s:04d}.parquet")
        if "npy" in out:
            np.save(out["npy"] / f"audio_features-{s:04d}.npy", mean_audio)
            np.save(out["npy"] / f"visual_features-{s:04d}.npy", mean_rgb)
            (out["npy"] / f"ids-{s:04d}.txt").write_text("\n".join(ids) + "\n")
        print(f"  wrote shard {s + 1}/{shards} ({b} of {n} clips)", flush=True)
    for p in out.values():
        (p / "DONE.txt").write_text("")  # a marker every reader ignores (.txt)
    return out


def reader_speed(paths: dict[str, Path], n: int) -> list[dict]:
    rows = []
    for kind, path in paths.items():
        for processes in (1, 2):
            if kind == "npy" and processes == 2:
                continue  # the shard-folder loader reads in one process
            best = float("inf")
            for _ in range(2):  # the first run also warms the page cache: keep the faster
                start = time.perf_counter()
                if kind == "npy":
                    got = len(load_shard_folder(path))
                else:
                    got = sum(len(p.ids) for p in open_collection(path).read_all(processes))
                best = min(best, time.perf_counter() - start)
            assert got == n, (kind, got, n)
            rows.append({"format": kind, "processes": processes, "clips": n, "seconds": best, "clips_per_s": n / best})
            print(f"  {kind:8s} {processes} proc: {n / best:9.0f} clips/s ({best:.2f} s)", flush=True)
    return rows


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of a child process, from wait4's rusage."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    return seconds, usage.ru_maxrss / 2**20  # KiB -> GiB


def tiny_model(work: Path) -> Path:
    model = work / "tiny-model"
    if not (model / "manifest.json").is_file():
        subprocess.run([PY, "-m", "training", "train", "--config", "tiny", "--data", "synthetic", "--out", str(work / "tiny-run"), "--quiet"], cwd=REPO, check=True)
        subprocess.run([PY, "-m", "training", "export", "--run", str(work / "tiny-run"), "--out", str(model)], cwd=REPO, check=True)
    return model


def index_jobs(work: Path, model: Path, sizes: list[int], shards_per_clip: float) -> list[dict]:
    rows = []
    for n in sizes:
        shards = max(2, int(round(n * shards_per_clip)))
        paths = write_collections(work / f"index-{n}", n, shards, 1, ("video", "parquet", "npy"))
        for kind, path in paths.items():
            out = work / f"job-{n}-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [PY, "-m", "index", "build", "--model", str(model), "--data", str(path), "--out", str(out), "--no-progress"]
            seconds, peak = run_measured(cmd, work / f"job-{n}-{kind}.log")
            rows.append({"format": kind, "clips": n, "shards": shards, "seconds": seconds, "clips_per_s": n / seconds, "peak_rss_gib": peak})
            print(f"  index build {kind:8s} {n:9d} clips: {seconds:7.1f} s, peak {peak:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


INDEX_STAGE = """
import sys
from pathlib import Path
from index.job import build_index_from_shards
from index.sources import Partition
out, n, rows, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
parts = [Partition(f"p{k:05d}", min(rows, n - k * rows)) for k in range((n + rows - 1) // rows)]
index = build_index_from_shards(out, "visual", parts, "Flat", dim, "bench", None)
print(len(index))
"""


def index_stage(work: Path, n: int, rows: int, dim: int) -> dict:
    """The job's index stage alone at ``n`` clips: embedding shards as the job writes them (random
    ``dim``-d vectors, the bench's ids and labels metadata), then ``build_index_from_shards`` in a
    child whose peak RSS is measured. The embedding stage holds one shard at a time whatever n is,
    so the job's peak at n is the larger of the two stages."""
    from index.job import shard_path, write_shard

    out = work / f"stage-{n}"
    rng = np.random.default_rng(0)
    for k in range((n + rows - 1) // rows):
        path = shard_path(out, "visual", f"p{k:05d}")
        if not path.is_file():
            a, b = k * rows, min(n, (k + 1) * rows)
            vectors = rng.standard_normal((b - a, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            write_shard(path, vectors, [f"v{i:08d}" for i in range(a, b)], [{"labels": [i % 3862, (i * 7) % 3862]} for i in range(a, b)])
    shutil.rmtree(out / "visual", ignore_errors=True)
    seconds, peak = run_measured([PY, "-c", INDEX_STAGE, str(out), str(n), str(rows), str(dim)], work / f"stage-{n}.log")
    print(f"  index stage alone, {n} clips ({dim}-d Flat): {seconds:.1f} s, peak {peak:.2f} GiB", flush=True)
    return {"clips": n, "dim": dim, "seconds": seconds, "peak_rss_gib": peak}


def training_memory(work: Path, sizes: list[int]) -> list[dict]:
    rows = []
    for n in sizes:
        folder = work / f"train-{n}"
        if not (folder / "ids.txt").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            rng = np.random.default_rng(0)
            # Random 8-bit codes: the memory figure needs the size, not learnable structure.
            np.save(folder / "audio_features.npy", rng.integers(0, 256, (n, D_A), dtype=np.uint8))
            np.save(folder / "visual_features.npy", rng.integers(0, 256, (n, D_V), dtype=np.uint8))
            (folder / "ids.txt").write_text("".join(f"v{i:08d}\n" for i in range(n)))
        cmd = [PY, "-m", "training", "train", "--config", "tiny", "--data", str(folder), "--out", str(work / f"train-run-{n}"), "--quiet"]
        shutil.rmtree(work / f"train-run-{n}", ignore_errors=True)
        seconds, peak = run_measured(cmd, work / f"train-{n}.log")
        rows.append({"clips": n, "data_gib": n * (D_A + D_V) / 2**30, "seconds": seconds, "peak_rss_gib": peak})
        print(f"  train {n:9d} clips (uint8 {n * (D_A + D_V) / 2**30:.2f} GiB): {seconds:6.1f} s, peak {peak:.2f} GiB", flush=True)
    return rows


def slope(rows: list[dict], key: str = "peak_rss_gib") -> tuple[float, float]:
    """(GiB at zero clips, bytes per clip) of a least-squares line through the rows."""
    x = np.array([r["clips"] for r in rows], float)
    y = np.array([r[key] for r in rows], float)
    per_clip, base = np.polyfit(x, y, 1)
    return float(base), float(per_clip * 2**30)


def report(result: dict) -> str:
    lines = ["# Formats benchmark", "", f"Machine: {result['machine']}. Command: `{result['command']}`.", "", "## Readers (clips/s, page cache warm)", ""]
    lines += ["| format | processes | clips | seconds | clips/s | × .npy shards |", "|---|---|---|---|---|---|"]
    npy = next(r["clips_per_s"] for r in result["readers"] if r["format"] == "npy")
    for r in result["readers"]:
        lines.append(f"| {r['format']} | {r['processes']} | {r['clips']} | {r['seconds']:.2f} | {r['clips_per_s']:.0f} | {r['clips_per_s'] / npy:.3f} |")
    lines += ["", "## Index job (`python -m index build`, Flat, tiny model)", "", "| format | clips | shards | seconds | clips/s | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for r in result["index"]:
        lines.append(f"| {r['format']} | {r['clips']} | {r['shards']} | {r['seconds']:.1f} | {r['clips_per_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    for kind, fit in result["index_fit"].items():
        lines.append(f"\n{kind}: two-size fit {fit['base_gib']:.2f} GiB + {fit['bytes_per_clip']:.0f} B/clip → {fit['at_1e7_gib']:.1f} GiB at 10^7 clips (extrapolated, not run)")
    if "index_stage" in result:
        r = result["index_stage"]
        lines.append(
            f"\nIndex stage alone at {r['clips']:,} clips ({r['dim']}-d Flat, ids and labels metadata): {r['seconds']:.0f} s, "
            f"**peak {r['peak_rss_gib']:.2f} GiB**; the embedding stage holds one shard whatever the size, so the job's peak at that "
            "size is the larger of this and the embedding-stage peak above."
        )
    lines += ["", "## Training memory (`python -m training train --config tiny`, uint8 feature directory kept 8-bit)", ""]
    lines += ["| clips | uint8 data GiB | seconds | peak RSS GiB |", "|---|---|---|---|"]
    for r in result["training"]:
        lines.append(f"| {r['clips']} | {r['data_gib']:.2f} | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} |")
    fit = result["training_fit"]
    lines.append(f"\npeak ≈ {fit['base_gib']:.2f} GiB + {fit['bytes_per_clip']:.0f} B/clip → **{fit['at_yt8m_gib']:.1f} GiB at YouTube-8M's 6.1 M clips** (extrapolated)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-formats-bench"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reader-clips", type=int, default=20_000)
    parser.add_argument("--frames", type=int, default=30, help="8-bit frames per frame-level clip")
    parser.add_argument("--index-clips", type=int, default=1_000_000)
    parser.add_argument("--train-clips", default="250000,500000,1000000")
    parser.add_argument("--stage-clips", type=int, default=10_000_000, help="clips of the index-stage-alone measurement")
    parser.add_argument("--parts", default="readers,index,stage,training")
    args = parser.parse_args()
    if args.quick:
        args.reader_clips, args.index_clips, args.train_clips = 2000, 20_000, "20000,40000"
    args.work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    name = "formats_bench_quick" if args.quick else "formats_bench"
    previous = RESULTS / f"{name}.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    result.update({"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)", "command": "python bench/formats_bench.py " + " ".join(sys.argv[1:])})
    if "readers" in parts:
        print(f"readers: {args.reader_clips} clips, frame level with {args.frames} frames", flush=True)
        paths = write_collections(args.work / f"readers-{args.reader_clips}-{args.frames}", args.reader_clips, 20, args.frames, ("video", "frame", "parquet", "npy"))
        result["readers"] = reader_speed(paths, args.reader_clips)
    if "index" in parts:
        model = tiny_model(args.work)
        sizes = [args.index_clips // 4, args.index_clips]
        result["index"] = index_jobs(args.work, model, sizes, 100 / 1_000_000 if not args.quick else 4 / 20_000)
        result["index_fit"] = {}
        for kind in ("video", "parquet", "npy"):
            base, per_clip = slope([r for r in result["index"] if r["format"] == kind])
            result["index_fit"][kind] = {"base_gib": base, "bytes_per_clip": per_clip, "at_1e7_gib": base + per_clip * 1e7 / 2**30}
    if "stage" in parts:
        result["index_stage"] = index_stage(args.work, args.stage_clips if not args.quick else 100_000, 10_000, 8)
    if "training" in parts:
        result["training"] = training_memory(args.work, [int(x) for x in args.train_clips.split(",")])
        base, per_clip = slope(result["training"])
        result["training_fit"] = {"base_gib": base, "bytes_per_clip": per_clip, "at_yt8m_gib": base + per_clip * YT8M_CLIPS / 2**30}
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(result, indent=2))
    if all(k in result for k in ("readers", "index", "training")):
        (RESULTS / f"{name}.md").write_text(report(result))
        print(report(result))


if __name__ == "__main__":
    main()
