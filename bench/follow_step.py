"""What one step of the background follower costs, by its size: CPU a step and a change.

    python bench/follow_step.py                          # 10^6 Flat and HNSW32, 2 rounds (~6 min)

Each other process applies a change another worker logged in steps of a few records
(store.sharedlog.Follower). A step pays a fixed part (reading the log, the index's write lock, the
item table's and FAISS's per-call work) and a part per record; its length is how long the nice-10
applier may hold a core that a request's thread wakes for (bench/step_length.py). Here, as in
bench/follow_cost.py, a forked child logs single-item changes to the tiny model's index and the
parent applies them with ``Collection.catch_up(k)`` step after step, for k in ``--steps``, timed with
the thread's CPU clock. Upserts of new ids, then deletes of them. Writes bench/results/follow_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.follow_cost import following_primary, write_in_child  # noqa: E402
from bench.http_bench import commit  # noqa: E402
from bench.write_bench import build_index, tiny_model  # noqa: E402
from store.collection import Collection  # noqa: E402

RESULTS = REPO / "bench" / "results"


def stepped(primary: Collection, step: int) -> tuple[float, int]:
    """CPU seconds and steps to apply everything logged, ``step`` records a modality at a time."""
    started, steps = time.thread_time(), 0
    while primary.catch_up(step):
        steps += 1
    return time.thread_time() - started, steps


def measure(model: Path, work: Path, items: int, factory: str, steps: list[int], changes: int, rounds: int) -> list[dict]:
    index, _ = build_index(model, work, items, factory, copy="-follow-step")
    primary = following_primary(model, index)
    try:
        dim = primary.embedder.manifest["input_dims"]["audio"]
        vectors = np.random.default_rng(0).standard_normal((changes, dim)).astype(np.float32)
        spent: dict[tuple[int, str], list[tuple[float, int]]] = {}
        for round_ in range(rounds):
            for step in steps:
                ids = [f"step-{round_}-{step}-{i}" for i in range(changes)]
                for op in ("upsert", "delete"):
                    write_in_child(primary, [(op, i) for i in ids], vectors)
                    spent.setdefault((step, op), []).append(stepped(primary, step))
                    seconds, count = spent[(step, op)][-1]
                    print(f"{factory} round {round_ + 1}/{rounds}, step {step}, {op}: {1e6 * seconds / changes:.1f} us a change, {1e6 * seconds / count:.0f} us a step", flush=True)
    finally:
        primary.close()
        shutil.rmtree(index, ignore_errors=True)
    return [
        {"factory": factory, "step": step, "op": op, "changes": changes, "rounds": len(runs),
         "us_per_change": round(statistics.median(1e6 * s / changes for s, _ in runs), 1),
         "us_per_step": round(statistics.median(1e6 * s / n for s, n in runs), 1)}
        for (step, op), runs in spent.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--changes", type=int, default=1000, help="changes a step size and kind, each round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"), help="model and built indexes (bench/write_bench.py's), kept")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(args.work)
    rows = [row for factory in args.factories for row in measure(model, args.work, int(args.items), factory, args.steps, args.changes, args.rounds)]
    out = {"command": "python " + " ".join(["bench/follow_step.py", *sys.argv[1:]]), "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", "items": int(args.items), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "follow_step.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# One step of the background follower, by its size (`{out['command']}`)", "",
        f"{out['machine']}, commit {out['commit']}; {int(args.items):,} items of the tiny model; {args.changes:,} single-item changes a size and kind, each its own log record, applied by `Collection.catch_up(step)` step after step; thread CPU time, medians of {args.rounds} rounds.", "",
        "| index | change | records a step | CPU us a step | CPU us a change |", "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['factory']} | {r['op']} | {r['step']} | {r['us_per_step']:,.0f} | {r['us_per_change']} |" for r in sorted(rows, key=lambda r: (r["factory"], r["op"] != "upsert", r["step"]))]
    (RESULTS / "follow_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
