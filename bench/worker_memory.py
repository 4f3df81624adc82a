"""Memory of a collection served by 1 and by 2 worker processes (issue 22: ``AVSEARCH_WORKERS``).

    python bench/worker_memory.py                    # 10^6 items per modality, Flat and HNSW32 (~2 min; first use: + ~2 min of builds)
    python bench/worker_memory.py --items 10000      # validation run (~30 s)
    python bench/worker_memory.py --factories Flat --workers 2,3 --name worker_memory_2v3   # what one more worker adds

Per index type (Flat, HNSW32): audio and visual indexes of ``--items`` random unit vectors at the
model's embedding width E (bench/write_bench.py's ``build_index``; built once and cached in
``--work``, copied per server start) are served by ``python -m service serve`` with
``AVSEARCH_WORKERS=1``, then ``=2``, one server at a time. Memory is read twice per server: once the
server answers /readyz and its process tree has stopped changing, and after ``--searches`` searches
through the server (16 keep-alive connections, audio and visual queries alternating, top 10; the
answers must all be 200). Memory is the sum over the server's process tree (the primary and its
descendants, from ``/proc/PID/task/*/children``, or each process's parent in ``/proc/PID/stat`` on
kernels without those files) of ``/proc/PID/smaps_rollup``: PSS (shared pages split between the
processes mapping them, so the sum counts each page once), RSS and USS (private pages) per process.

Figure of merit: (total PSS with 2 workers - total PSS with 1 worker) / the index files' bytes on
disk (index.faiss + items.bin of both modalities), after the searches; target <= 10 %. Beside it,
the same extra over the index's resident size: the 1-worker server's PSS less that of the same
server on a 1,000-item index (measured first), i.e. what the index holds in memory, which is what
forking shares. Writes bench/results/<--name>.{json,md} (worker_memory by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import closed_loop, commit, http_requests  # noqa: E402
from bench.server_tree import stop_tree, tree_memory  # noqa: E402
from bench.trained import trained_default_model  # noqa: E402
from bench.write_bench import build_index, serve  # noqa: E402
from index.embedder import load_manifest  # noqa: E402
from index.store import INDEX_NAME, ITEMS_NAME  # noqa: E402

RESULTS = REPO / "bench" / "results"
TARGET_EXTRA_PSS = 0.10  # of the index files' bytes
BASELINE_ITEMS = 1000  # the server with (almost) no index: what a server holds besides its index


def search_load(port: int, input_dims: dict[str, int], searches: int) -> None:
    rng = np.random.default_rng(0)
    audio, visual = (http_requests(rng.standard_normal((64, input_dims[m]), dtype=np.float32), binary=False, modality=m) for m in ("audio", "visual"))
    requests = [r for pair in zip(audio, visual) for r in pair]  # both indexes searched
    result = asyncio.run(closed_loop(port, requests, clients=16, warmup=0.0, duration=600.0, max_requests=searches))
    if result["errors"]:
        raise RuntimeError(f"search load: {result['errors']} of {result['requests']} answers not 200")


def measure(model: Path, work: Path, n: int, factory: str, workers: int, input_dims: dict[str, int], searches: int) -> dict:
    index, build_s = build_index(model, work, n, factory, visual=(n, factory))
    index_bytes = sum((index / m / name).stat().st_size for m in ("audio", "visual") for name in (INDEX_NAME, ITEMS_NAME))
    started = time.perf_counter()
    proc, port = serve(model, index, snapshot_seconds=300, workers=workers)
    try:
        ready_s = time.perf_counter() - started
        after_ready = tree_memory(proc.pid)
        search_load(port, input_dims, searches)
        after_searches = tree_memory(proc.pid)
    finally:
        outlived = stop_tree(proc)
        shutil.rmtree(index, ignore_errors=True)
    row = {"items": n, "factory": factory, "workers": workers, "index_bytes": index_bytes, "build_s": round(build_s, 1), "ready_s": round(ready_s, 1),
           "after_ready": after_ready, "after_searches": after_searches, "outlived_primary": outlived, "load_average_1min": round(os.getloadavg()[0], 2)}
    print(f"{factory} workers={workers}: {len(after_searches['processes'])} processes, PSS {mb(after_ready['total_pss'])} MB after ready, "
          f"{mb(after_searches['total_pss'])} MB after {searches} searches; index files {mb(index_bytes)} MB", flush=True)
    return row


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def figures(rows: list[dict], workers: tuple[int, int], baseline: dict) -> dict:
    """Per index type: the extra PSS of the second worker count over the first, over the index files'
    bytes, and over the index's resident size (the first count's PSS less the ``baseline`` server's:
    the same server on a 1,000-item index, so what the index itself holds in memory)."""
    by = {(r["factory"], r["workers"]): r for r in rows}
    out = {}
    for factory in dict.fromkeys(r["factory"] for r in rows):
        one, two = by[(factory, workers[0])], by[(factory, workers[1])]
        resident = one["after_searches"]["total_pss"] - baseline["after_searches"]["total_pss"]
        extra = {when: two[when]["total_pss"] - one[when]["total_pss"] for when in ("after_ready", "after_searches")}
        extra_anon = two["after_searches"]["total_pss_anon"] - one["after_searches"]["total_pss_anon"]
        ratio = extra["after_searches"] / one["index_bytes"]
        out[factory] = {"extra_pss_bytes": extra, "index_bytes": one["index_bytes"], "extra_over_index": round(ratio, 4),
                        "extra_over_index_after_ready": round(extra["after_ready"] / one["index_bytes"], 4),
                        "extra_pss_anon_bytes": extra_anon, "extra_anon_over_index": round(extra_anon / one["index_bytes"], 4),
                        "index_resident_bytes": resident, "extra_over_resident": round(extra["after_searches"] / resident, 4),
                        "target": TARGET_EXTRA_PSS, "met": ratio <= TARGET_EXTRA_PSS}
    return out


def markdown(out: dict) -> str:
    lines = ["# Memory with 1 and 2 worker processes (`bench/worker_memory.py`)", "",
             f"`{out['command']}` on {out['machine']}, commit {out['commit']}; {out['items']:,} random unit vectors per modality (E = {out['embedding_dim']}), "
             f"memory summed over the server's process tree from /proc/PID/smaps_rollup, once ready and after {out['searches']:,} searches. "
             f"Load average before / after: {out['load_average_before']} / {out['load_average_after']}.", "",
             "| index | workers | processes (outliving the primary) | PSS MB ready | PSS MB after searches | RSS MB after | USS MB after | per process PSS / RSS MB after | index files MB | start s |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in out["rows"]:
        a, s = r["after_ready"], r["after_searches"]
        per = "; ".join(f"{p['role']} {mb(p['pss'])} / {mb(p['rss'])}" for p in s["processes"])
        lines.append(f"| {r['factory']} | {r['workers']} | {len(s['processes'])} ({r['outlived_primary']}) | {mb(a['total_pss'])} | {mb(s['total_pss'])} | {mb(s['total_rss'])} | "
                     f"{mb(s['total_uss'])} | {per} | {mb(r['index_bytes'])} | {r['ready_s']} |")
    w = out["workers"]
    lines += ["", f"| index | extra PSS, {w[1]} workers - {w[0]}, MB (ready / after searches) | / index files (ready) | / index files (after searches) | target | "
              "extra anonymous PSS after searches, MB (/ index files) | index resident MB | / index resident (after searches) |", "|---|---|---:|---:|---|---|---:|---:|"]
    for factory, f in out["figures"].items():
        lines.append(f"| {factory} | {mb(f['extra_pss_bytes']['after_ready'])} / {mb(f['extra_pss_bytes']['after_searches'])} | "
                     f"{f['extra_over_index_after_ready']:.1%} | {f['extra_over_index']:.1%} | ≤ {f['target']:.0%} {'✓' if f['met'] else '✗'} | "
                     f"{mb(f['extra_pss_anon_bytes'])} ({f['extra_anon_over_index']:.1%}) | {mb(f['index_resident_bytes'])} | {f['extra_over_resident']:.1%} |")
    lines += ["", "PSS splits a shared page between every process that maps it, other jobs' processes included: the libraries' pages (file-backed) "
              "count less while other Python processes on the machine map the same files. The anonymous PSS (the index, the Python heap; shared "
              "only by forking) does not depend on them: the cross-check of the figure on a busy machine. \"Index resident\": the "
              f"first count's PSS after the searches less that of the same server on a {BASELINE_ITEMS:,}-item index "
              f"({mb(out['baseline']['after_searches']['total_pss'])} MB): what the index holds in memory (vectors, item table, the "
              "exact search's transposed copy, room for writes), which is what the workers share."]
    return "\n".join(lines + ["", *out["notes"]]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e6, help="items per modality")
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"])
    parser.add_argument("--workers", default="1,2", help="the two worker counts compared")
    parser.add_argument("--searches", type=int, default=2000, help="searches through the server before the second reading")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-http-bench"), help="model (shared with bench/http_bench.py) and built indexes, kept")
    parser.add_argument("--note", action="append", default=[], help="a line added under the tables")
    parser.add_argument("--name", default="worker_memory", help="results file stem under bench/results (another comparison, e.g. --workers 2,3, need not replace the 1,2 figures)")
    args = parser.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    assert len(workers) == 2, "--workers: two counts, e.g. 1,2"
    model = trained_default_model(args.work)
    manifest, _ = load_manifest(model)
    input_dims = {m: int(d) for m, d in manifest["input_dims"].items()}
    load_before = [round(x, 2) for x in os.getloadavg()]
    baseline = measure(model, args.work, BASELINE_ITEMS, "Flat", workers[0], input_dims, args.searches)
    rows = [measure(model, args.work, int(args.items), f, w, input_dims, args.searches) for f in args.factories for w in workers]
    out = {
        "command": "python " + " ".join(["bench/worker_memory.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "items": int(args.items), "embedding_dim": int(manifest["embedding_dim"]), "searches": args.searches, "workers": workers,
        "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows, "baseline": baseline, "figures": figures(rows, workers, baseline), "notes": args.note,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
