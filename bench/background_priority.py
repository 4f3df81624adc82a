"""What background work at a low priority costs a single client's writes: why store.sharedlog's
Follower runs at SCHED_IDLE rather than nice 19.

    python bench/background_priority.py                 # 10^6 Flat, 4 rounds (~2 min)

A 1-worker server (``python -m service serve``, bench/write_bench.py's index and model) takes
single-item upserts from 1 client for ``--seconds`` per run, in three settings taken in turn (the
order reversed each round): nothing else running; one busy loop per core at nice 19; one per core at
SCHED_IDLE (``chrt -i 0``). Each figure is the median over the rounds; the ratio is against nothing
else running. Results: ``bench/results/background_priority.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402
from bench.server_tree import stop_tree  # noqa: E402
from bench.write_bench import build_index, run_requests, serve, tiny_model, upsert_request  # noqa: E402

RESULTS = REPO / "bench" / "results"
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]
SETTINGS = {"nothing else": None, "busy loops at nice 19": ["nice", "-n", "19"], "busy loops at SCHED_IDLE": ["chrt", "-i", "0"]}


def busy_loops(prefix: list[str] | None) -> list[subprocess.Popen]:
    if prefix is None:
        return []
    loops = [subprocess.Popen(prefix + BUSY_LOOP) for _ in range(os.cpu_count() or 1)]
    time.sleep(0.3)
    return loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="of upserts per setting and round")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"))
    args = parser.parse_args()
    model = tiny_model(args.work)
    index, _ = build_index(model, args.work, int(args.items), args.factory, copy="-priority")
    proc, port = serve(model, index, snapshot_seconds=3.0)
    rng = np.random.default_rng(0)
    upserts = [upsert_request([f"p{i}"], rng) for i in range(int(5000 * args.seconds * args.rounds * len(SETTINGS)))]
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    sent = 0
    try:
        for r in range(args.rounds):
            for name in SETTINGS if r % 2 == 0 else reversed(SETTINGS):
                loops = busy_loops(SETTINGS[name])
                try:
                    result = asyncio.run(run_requests(port, upserts[sent:], 1, args.seconds))
                finally:
                    for loop in loops:
                        loop.kill()
                        loop.wait()
                sent += result["requests"]
                runs[name].append(result)
                time.sleep(args.seconds)  # the fold of what was written
    finally:
        stop_tree(proc)
    base = {f: statistics.median(r[f] for r in runs["nothing else"]) for f in ("per_s", "p50_ms", "p99_ms")}
    rows = []
    for name, results in runs.items():
        row = {"setting": name, **{f: round(statistics.median(r[f] for r in results), 2) for f in ("per_s", "p50_ms", "p99_ms")}, "errors": sum(r["errors"] for r in results)}
        row["p99_ratio"] = round(row["p99_ms"] / base["p99_ms"], 2)
        rows.append(row)
    out = {"command": "python " + " ".join(["bench/background_priority.py", *sys.argv[1:]]), "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}",
           "commit": commit(), "items": int(args.items), "factory": args.factory, "rounds": args.rounds, "seconds": args.seconds, "rows": rows, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "background_priority.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Background work at a low priority against one client's upserts (`bench/background_priority.py`)", "",
             f"`{out['command']}` on {out['machine']}, commit {out['commit']}; a 1-worker server on {out['items']:,} {out['factory']} items; "
             f"{args.rounds} rounds of {args.seconds} s per setting, the settings in turn (reversed each round); medians over the rounds; "
             f"busy loops: one per core.", "",
             "| setting | upserts/s | p50 ms | p99 ms | p99 / nothing else | errors |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['p99_ratio']:.2f} | {r['errors']} |" for r in rows]
    (RESULTS / "background_priority.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
