"""What a checkpoint's file writing does to the write-ahead log's fsyncs, with and without flush-behind.

    python bench/flush_behind.py                  # a 700 MB file (10^6 HNSW32 items' checkpoint), 5 rounds (~2 min)
    python bench/flush_behind.py --mb 200 --rounds 1

One process appends 512 bytes and fsyncs, over and over (the log of one client's writes); another
writes a ``--mb`` MB file the way a checkpoint does (``avdata.atomic.atomic_file``: streamed in
1 MiB writes, fsynced at the end), either plainly or through ``FlushBehind`` (writeback started
every chunk, at most two chunks in flight). Reported per way of writing: the log's fsync latency
while the file is written (p50, p99, max) and how long the file took. Rounds alternate between the
ways, so the disk's drift falls on each alike. Writes bench/results/flush_behind.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from avdata.atomic import FlushBehind, atomic_file  # noqa: E402
from bench.http_bench import commit  # noqa: E402

RESULTS = REPO / "bench" / "results"
BLOCK = 1 << 20  # FAISS's write callback hands over about this much at a time


def write_file(path: Path, mb: int, chunk: int | None) -> None:
    block = os.urandom(BLOCK)
    with atomic_file(path) as f:
        stream = FlushBehind(f, chunk) if chunk else f
        for _ in range(mb):
            stream.write(block)


def probe_fsyncs(path: Path, out: Path, stop) -> None:
    latencies, record = [], b"x" * 512
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while not stop.is_set():
            os.write(fd, record)
            started = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.001)  # about one client's pace
    finally:
        os.close(fd)
    np.save(out, np.array(latencies))


def one_round(work: Path, mb: int, chunk: int | None) -> dict:
    stop = multiprocessing.Event()
    prober = multiprocessing.Process(target=probe_fsyncs, args=(work / "log", work / "latencies.npy", stop))
    prober.start()
    time.sleep(0.5)
    started = time.perf_counter()
    writer = multiprocessing.Process(target=write_file, args=(work / "checkpoint", mb, chunk))
    writer.start()
    writer.join()
    seconds = time.perf_counter() - started
    stop.set()
    prober.join()
    latencies = np.load(work / "latencies.npy") * 1000
    (work / "log").unlink()
    return {"file_s": round(seconds, 2), "fsyncs": len(latencies), "p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "p99_ms": round(float(np.percentile(latencies, 99)), 2), "max_ms": round(float(latencies.max()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=700, help="the checkpoint file's size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks-mb", type=float, nargs="+", default=[8, 1, 0.25], help="flush-behind chunk sizes compared with plain writing")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder under the repository, on its disk)")
    args = parser.parse_args()
    ways = {"plain": None, **{f"flush-behind {c:g} MB": int(c * (1 << 20)) for c in args.chunks_mb}}
    rounds: dict[str, list[dict]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(dir=args.dir or REPO, prefix=".flush-behind-") as folder:
        work = Path(folder)
        for r in range(args.rounds):
            for way in ways if r % 2 == 0 else reversed(list(ways)):
                rounds[way].append(one_round(work, args.mb, ways[way]))
                print(way, rounds[way][-1], flush=True)
    medians = {way: {key: float(np.median([x[key] for x in runs])) for key in runs[0]} for way, runs in rounds.items()}
    out = {"command": "python " + " ".join(["bench/flush_behind.py", *sys.argv[1:]]), "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "mb": args.mb, "rounds": rounds, "medians": medians}
    lines = [f"# The log's fsyncs while a checkpoint file is written (`{out['command']}`)", "",
             f"{out['machine']}, commit {out['commit']}: a {args.mb} MB file written while another process appends 512 bytes and fsyncs, "
             f"every ~1 ms; median over {args.rounds} rounds (alternating; every round in the JSON).", "",
             "| file written | log fsync p50 ms | p99 ms | max ms | fsyncs | file written in s |", "|---|---:|---:|---:|---:|---:|"]
    for way, m in medians.items():
        lines.append(f"| {way} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['max_ms']:.1f} | {m['fsyncs']:.0f} | {m['file_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flush_behind.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "flush_behind.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
