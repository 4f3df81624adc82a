"""What a single-item upsert costs each process in page faults and TLB shootdowns, 1 vs 2 workers:
whether copy-on-write is why 2 workers' one-client HNSW write tail was longer than 1 worker's
(issue 22; it was not: bench/results/write_faults.md).

    python bench/write_faults.py                              # 10^6 HNSW32, 3 rounds of 6 s (~4 min; first use: + the index build)
    python bench/write_faults.py --factory Flat --name write_faults_flat

A forked worker shares the index's pages with the primary and the other worker copy-on-write. An
HNSW insert writes the link lists of the new item's neighbours, pages all over the graph; the first
write to each such page in a process copies it (a page fault), and replacing a page mapped by
several threads of a process flushes its TLB entry on every core that runs them (an interrupt to
each: a shootdown). Every process applies every change, so each pays this on its own copy.

Both servers (``AVSEARCH_WORKERS=1`` and ``=2``, bench/write_bench.py's index, each its own copy,
no folds) are up at once; each round times ``--seconds`` of single-item upserts by one client on
one server, then on the other (the order flips every round). Around each turn it reads every
process's minor and major faults (``/proc/PID/stat``) and the machine's TLB shootdowns
(``/proc/interrupts``; the other server is idle meanwhile, and other jobs add theirs). Figures are
totals over the rounds divided by the upserts. Results: ``bench/results/<--name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402
from bench.server_tree import process_memory, role, settled_tree, stop_tree  # noqa: E402
from bench.write_bench import build_index, run_requests, serve, tiny_model, upsert_request  # noqa: E402

RESULTS = REPO / "bench" / "results"


def faults(pid: int) -> tuple[int, int]:
    """(minor, major) page faults of one process so far (0, 0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[7]), int(fields[9])  # minflt, majflt: fields 10 and 12 of proc(5), counted after "(comm)"


def tlb_shootdowns() -> int:
    for line in Path("/proc/interrupts").read_text().splitlines():
        if line.strip().startswith("TLB:"):
            return sum(int(x) for x in line.split()[1:] if x.isdigit())
    return 0


def roles(pid: int, workers: int) -> dict[int, str]:
    """pid -> its part in the server: server (1 worker: one process serves), primary, worker N, spawned..."""
    processes = [process_memory(p) for p in settled_tree(pid)]
    named, forked = {}, 0
    for p in processes:
        name = role(p, processes[0])
        if name == "forked":
            forked += 1
            name = f"worker {forked}"
        named[p["pid"]] = "server" if name == "primary" and workers == 1 else name
    return named


def turn(port: int, pids: dict[int, str], tag: str, seconds: float) -> dict:
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    requests = [upsert_request([f"{tag}-{i}"], rng) for i in range(int(2000 * seconds))]
    before = {pid: faults(pid) for pid in pids}
    tlb = tlb_shootdowns()
    result = asyncio.run(run_requests(port, requests, clients=1, duration=seconds))
    tlb = tlb_shootdowns() - tlb
    after = {pid: faults(pid) for pid in pids}
    return {"requests": result["requests"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "errors": result["errors"], "tlb": tlb,
            "minor": {pids[p]: after[p][0] - before[p][0] for p in pids}, "major": {pids[p]: after[p][1] - before[p][1] for p in pids}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--factory", default="HNSW32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"), help="shared with bench/write_bench.py")
    parser.add_argument("--name", default="write_faults")
    args = parser.parse_args()
    model = tiny_model(args.work)
    n = int(args.items)
    servers = {}
    try:
        for workers in (1, 2):
            index, _ = build_index(model, args.work, n, args.factory, copy=f"-faults-{workers}")
            proc, port = serve(model, index, snapshot_seconds=100_000, workers=workers)
            servers[workers] = (proc, port, roles(proc.pid, workers))
        turns = {1: [], 2: []}
        for r in range(args.rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                proc, port, pids = servers[workers]
                turns[workers].append(turn(port, pids, f"r{r}w{workers}", args.seconds))
                print(f"round {r + 1}, {workers} worker(s): {json.dumps(turns[workers][-1])}", flush=True)
                time.sleep(1.0)
    finally:
        for proc, _, _ in servers.values():
            stop_tree(proc)
    rows = []
    for workers, results in turns.items():
        upserts = sum(t["requests"] for t in results)
        names = results[0]["minor"].keys()
        rows.append({"workers": workers, "upserts": upserts, "errors": sum(t["errors"] for t in results),
                     "p50_ms": round(float(np.median([t["p50_ms"] for t in results])), 2), "p99_ms": round(float(np.median([t["p99_ms"] for t in results])), 2),
                     "minor_faults_per_upsert": {name: round(sum(t["minor"][name] for t in results) / upserts, 1) for name in names},
                     "major_faults": {name: sum(t["major"][name] for t in results) for name in names},
                     "tlb_shootdowns_per_upsert": round(sum(t["tlb"] for t in results) / upserts, 1)})
    out = {"command": "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version(), "items": n, "factory": args.factory, "rounds": args.rounds, "seconds": args.seconds, "rows": rows, "turns": turns}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    lines = [f"# Page faults of single-item upserts, 1 and 2 workers (`{out['command']}`)", "",
             f"{n:,} {args.factory} audio items, one client, {args.rounds} rounds of {args.seconds:g} s per server taken in turn, no folds; "
             f"commit {out['commit']}, {out['machine']}, Python {out['python']}. Faults per upsert are minor faults (a page copied, or first touched) of each process, "
             "summed over the rounds and divided by the upserts; TLB shootdowns are the machine's.", "",
             "| workers | upserts | p50 ms | p99 ms | minor faults per upsert, by process | major faults | TLB shootdowns per upsert | errors |",
             "|---:|---:|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        by_process = "; ".join(f"{name} {v:g}" for name, v in row["minor_faults_per_upsert"].items())
        lines.append(f"| {row['workers']} | {row['upserts']:,} | {row['p50_ms']} | {row['p99_ms']} | {by_process} | {sum(row['major_faults'].values())} | {row['tlb_shootdowns_per_upsert']:g} | {row['errors']} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
