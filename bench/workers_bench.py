"""Search throughput with 1 and 2 worker processes on one port (issue 22: ``AVSEARCH_WORKERS``).

    python bench/workers_bench.py                                  # 10^5 items, 1 vs 2 workers, 3 rounds of 10 s (~2 min; first use: + ~5 min of training and indexing)
    python bench/workers_bench.py --items 10000 --duration 3 --rounds 1    # validation

Setup as bench/http_bench.py (shared cache in --work: the default preset trained on the synthetic
default, N synthetic clips indexed exactly). For each worker count, one server at a time:
``python -m service serve`` with ``AVSEARCH_WORKERS=N``; once it answers /readyz and its process
tree has stopped changing, wrk (a separate C process, 1 thread, 64 keep-alive connections; pinned
with ``taskset`` to ``--wrk-cpu`` when given) POSTs one fixed JSON audio query (top 10 visual clips)
for ``--warmup`` seconds (not counted), then for ``--duration`` seconds with ``--latency``. The
answers are counted by status (bench/wrk_post.lua): searches/s counts the 2xx answers only; any
non-2xx answer or socket error (connect, read, write, timeout) fails the run's target. The counts
take turns for ``--rounds`` rounds, the order reversed each round (1,2 then 2,1, ...) so a drift in
the shared machine's load falls on both; each figure is the median over the rounds. wrk is not
pinned by default: at ~2,000 searches/s it used 4-7 % of one core here (its CPU share is recorded
per run), so pinning it to one of the 2 cores (tried: ``--wrk-cpu 1``) made no difference that the
machine's noise did not swamp, and would keep one worker off that core's idle time.

Targets (the last count against the first): searches/s ratio >= 1.3, p99 no worse, no errors.
Writes bench/results/workers_http.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit, free_port, http_stack, prepare, search_body, start  # noqa: E402
from bench.server_tree import process_memory, settled_tree, stop_tree  # noqa: E402

RESULTS = REPO / "bench" / "results"
SCRIPT = REPO / "bench" / "wrk_post.lua"
CONNECTIONS = 64
TARGET_RATIO = 1.3


def wrk(port: int, path: str, body_file: Path, content_type: str, seconds: int, cpu: int | None) -> dict:
    """One wrk run against the server: its WRK_JSON summary, with searches/s and milliseconds added."""
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(SCRIPT), f"http://127.0.0.1:{port}{path}", "--", str(body_file), content_type]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # the server is not waited for yet: the difference is wrk's
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(line for line in done.stdout.splitlines() if line.startswith("WRK_JSON "))
    summary = json.loads(line.removeprefix("WRK_JSON "))
    ok = sum(n for status, n in summary["statuses"].items() if status.startswith("2"))
    latency = summary["latency_us"]
    return {
        "searches_per_s": round(ok / (summary["duration_us"] / 1e6), 1),
        "p50_ms": latency["p50"] / 1e3, "p99_ms": latency["p99"] / 1e3, "max_ms": latency["max"] / 1e3, "mean_ms": round(latency["mean"] / 1e3, 3),
        "non_2xx": summary["requests"] - ok, "socket_errors": sum(summary["socket_errors"].values()), "socket_error_kinds": summary["socket_errors"],
        "requests": summary["requests"], "seconds": summary["duration_us"] / 1e6, "statuses": summary["statuses"],
        "wrk_cpu_share": round((now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime) / seconds, 3),  # of one core
    }


def measure(work: Path, workers: int, body: tuple[str, str, Path], args) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(work / "model"), "--index", str(work / "index"), "--port", str(port)]
    proc = start(cmd, port, {"AVSEARCH_WORKERS": str(workers)})
    try:
        processes = [process_memory(pid)["command"] for pid in settled_tree(proc.pid)]
        load_before = round(os.getloadavg()[0], 2)
        warmup = wrk(port, *body, args.warmup, args.wrk_cpu)
        row = {"workers": workers, "processes": processes, "load_average_1min_before": load_before, **wrk(port, *body, args.duration, args.wrk_cpu),
               "warmup": {k: warmup[k] for k in ("searches_per_s", "non_2xx", "socket_errors")}, "load_average_1min_after": round(os.getloadavg()[0], 2)}
    finally:
        outlived = stop_tree(proc)
    row["outlived_primary"] = outlived  # processes of the tree still there 10 s after the primary exited (killed)
    print(json.dumps({k: v for k, v in row.items() if k not in ("processes", "socket_error_kinds", "warmup")}), flush=True)
    return row


def summarize(rounds: dict[int, list[dict]]) -> dict:
    """Per count the median figures over the rounds; the last count against the first."""
    med = {w: {k: float(np.median([r[k] for r in rows])) for k in ("searches_per_s", "p50_ms", "p99_ms")} for w, rows in rounds.items()}
    errors = {w: sum(r["non_2xx"] + r["socket_errors"] for r in rows) for w, rows in rounds.items()}
    first, last = med[list(rounds)[0]], med[list(rounds)[-1]]
    ratio = last["searches_per_s"] / first["searches_per_s"]
    targets = {
        "throughput_ratio": {"value": round(ratio, 3), "target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
        "p99_ms": {"value": [first["p99_ms"], last["p99_ms"]], "target": "last <= first", "met": last["p99_ms"] <= first["p99_ms"]},
        "errors": {"value": list(errors.values()), "target": "0", "met": not any(errors.values())},
    }
    return {"median": {str(w): m for w, m in med.items()}, "errors": {str(w): e for w, e in errors.items()}, "targets": targets}


def markdown(out: dict) -> str:
    s = out["setup"]
    where = f"pinned to CPU {out['wrk_cpu']} (`taskset -c {out['wrk_cpu']}`)" if out["wrk_cpu"] is not None else "not pinned (the scheduler places it)"
    lines = [
        "# Search throughput with worker processes (`bench/workers_bench.py`)", "",
        f"`{out['command']}` on {out['machine']}, commit {out['commit']}, {out['date']}; {s['n_items']:,} items per modality (E = {s['embedding_dim']}, model {s['model']}), "
        f"exact search, uvicorn with {out['http_stack']}. Load: wrk 1 thread, {CONNECTIONS} keep-alive connections, one fixed JSON audio query (top 10), "
        f"{out['warmup']} s warm-up then {out['duration']} s measured per server; wrk runs on the same {os.cpu_count()} cores as the server, {where}. "
        f"Counts in turn for {out['rounds']} rounds (order reversed each round); figures are medians over the rounds. "
        f"Load average before / after: {out['load_average_before']} / {out['load_average_after']}.", "",
        "| round | workers | processes in the server's tree (outliving the primary) | searches/s | p50 ms | p99 ms | max ms | non-2xx | socket errors | wrk CPU, share of a core | load avg before / after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['round']} | {r['workers']} | {len(r['processes'])} ({r['outlived_primary']}) | {r['searches_per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | "
                     f"{r['non_2xx']} | {r['socket_errors']} | {r['wrk_cpu_share']:.0%} | {r['load_average_1min_before']} / {r['load_average_1min_after']} |")
    lines += ["", "| workers | searches/s (median) | p50 ms | p99 ms | errors |", "|---:|---:|---:|---:|---:|"]
    for w, m in out["summary"]["median"].items():
        lines.append(f"| {w} | {m['searches_per_s']:,.0f} | {m['p50_ms']:g} | {m['p99_ms']:g} | {out['summary']['errors'][w]} |")
    lines += ["", "Targets: " + ", ".join(f"{k} {'✓' if v['met'] else '✗'} ({v['value']}, target {v['target']})" for k, v in out["summary"]["targets"].items())]
    return "\n".join(lines + ["", *out["notes"]]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", default="1,2", help="worker counts (AVSEARCH_WORKERS), the first the baseline")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per server (wrk takes whole seconds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wrk-cpu", type=int, default=None, help="pin wrk to this CPU (taskset); default: not pinned")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-http-bench"), help="shared with bench/http_bench.py")
    parser.add_argument("--note", action="append", default=[], help="a line added under the tables")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found (apt-get install wrk)")
    counts = [int(w) for w in args.workers.split(",")]
    setup = prepare(args.work, args.items)
    path, content_type, body = search_body(np.load(args.work / "gallery" / "queries.npy")[0], binary=False)
    body_file = args.work / "wrk_body.json"
    body_file.write_bytes(body)
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows, rounds = [], {w: [] for w in counts}
    for r in range(args.rounds):
        for w in counts if r % 2 == 0 else counts[::-1]:
            rows.append({"round": r + 1, **measure(args.work, w, (path, body_file, content_type), args)})
            rounds[w].append(rows[-1])
    out = {
        "command": "python " + " ".join(["bench/workers_bench.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "setup": setup, "http_stack": http_stack(), "wrk_cpu": args.wrk_cpu, "duration": args.duration, "warmup": args.warmup, "rounds": args.rounds,
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows, "summary": summarize(rounds), "notes": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "workers_http.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "workers_http.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
