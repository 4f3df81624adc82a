"""What a process pays to apply a change another worker process logged (store.sharedlog's follow).

    python bench/follow_cost.py                     # 5 rounds of 4,000 single-item upserts, then as many deletes (~1 min)
    python bench/follow_cost.py --profile           # and where the time goes (cProfile, top 25)

With ``AVSEARCH_WORKERS=N`` every change is applied by every process: by the worker that took it
(in the foreground, before its answer) and by the other N workers and the primary, from the log
files, mostly in the background. On a machine with few cores that background work is what a 2-worker
server pays on write latency (bench/results/write_workers_ab.md), so its cost per change is the
figure to keep down. Here a forked child writes ``--changes`` single-item upserts (each its own log
record, as one client's writes are) to a 10^4-item Flat index of the tiny model (bench/write_bench.py's),
then as many deletes; the parent, which shares the log as the primary does, then applies them
(``Collection.catch_up``, what the background follower calls), timed with the process's CPU clock.
``--rounds`` rounds (this VM's speed drifts by 2x): the median and the fastest round. Writes
bench/results/follow_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402
from bench.write_bench import build_index, tiny_model  # noqa: E402
from store.collection import Collection  # noqa: E402
from store.sharedlog import OPEN, LogState  # noqa: E402

RESULTS = REPO / "bench" / "results"


def following_primary(model: Path, index: Path) -> Collection:
    """The index loaded as a primary that only follows a log shared with 2 worker slots (no checkpoints)."""
    primary = Collection.load(model, index, device="cpu", intra_op_threads=1)
    primary.checkpointer.stop()
    state = LogState(list(primary.shards), slots=2)
    for shard in primary.shards.values():
        shard.share(state, OPEN)
    return primary


def write_in_child(primary: Collection, ops: list[tuple[str, str]], vectors: np.ndarray) -> None:
    """Fork a worker from ``primary`` (commits paused, as service.workers forks) that logs ``ops``."""
    replica = Collection.replica(primary, primary.embedder)
    with ExitStack() as paused:
        for shard in primary.shards.values():
            paused.enter_context(shard.paused())
        positions = {m: shard.position() for m, shard in primary.shards.items()}
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for modality, shard in replica.shards.items():
                shard.join(primary.shards[modality].shared.state, positions[modality], 0)
            for (op, item_id), vector in zip(ops, vectors):
                if op == "upsert":
                    replica.upsert("audio", vector[None], [item_id], [{"bench": 1}])
                else:
                    replica.delete("audio", item_id)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the writing child failed ({status})")


def timed_catch_up(primary: Collection, profile: bool) -> tuple[float, str]:
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    primary.catch_up()
    if profiler:
        profiler.disable()
    seconds = time.process_time() - started
    report = ""
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        report = out.getvalue()
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=4000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "avsearch-write-bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile the last round")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(args.work)
    index, _ = build_index(model, args.work, args.items, "Flat", copy="-follow-cost")
    primary = following_primary(model, index)
    rows, reports = [], {}
    try:
        dim = primary.embedder.manifest["input_dims"]["audio"]
        vectors = np.random.default_rng(0).standard_normal((args.changes, dim)).astype(np.float32)
        seconds: dict[str, list[float]] = {"upsert": [], "delete": []}
        for round_ in range(args.rounds):
            ids = [f"follow-{round_}-{i}" for i in range(args.changes)]
            for op in seconds:
                write_in_child(primary, [(op, i) for i in ids], vectors)
                spent, reports[op] = timed_catch_up(primary, args.profile and round_ == args.rounds - 1)
                seconds[op].append(spent)
                print(f"round {round_ + 1}/{args.rounds}, {op}: {args.changes} logged changes applied in {spent:.3f} s of CPU", flush=True)
        for op, spent in seconds.items():
            rows.append({"op": op, "changes": args.changes, "rounds_cpu_s": [round(x, 4) for x in spent], "median_us": round(1e6 * statistics.median(spent) / args.changes, 1), "fastest_us": round(1e6 * min(spent) / args.changes, 1)})
            print(f"{op}: {rows[-1]['median_us']} us of CPU per change (median of {args.rounds} rounds; fastest {rows[-1]['fastest_us']})")
            if args.profile:
                print(reports[op])
    finally:
        primary.close()
        shutil.rmtree(index, ignore_errors=True)
    out = {"command": "python " + " ".join(["bench/follow_cost.py", *sys.argv[1:]]), "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "follow_cost.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"# Applying what another worker logged (`{out['command']}`)", "", f"{out['machine']}, commit {out['commit']}; a {args.items:,}-item Flat index of the tiny model, single-item changes, each its own log record; CPU time of `Collection.catch_up` (what each other process runs per change).", "", "| change | changes a round | rounds | CPU us per change, median | fastest |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['changes']:,} | {len(r['rounds_cpu_s'])} | {r['median_us']} | {r['fastest_us']} |" for r in rows]
    (RESULTS / "follow_cost.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
