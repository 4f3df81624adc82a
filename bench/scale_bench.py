"""Scale benchmark: the index from 10^6 to 10^8 items (id map, batch build, search, item changes).

    python bench/scale_bench.py                       # id map at 10^6, end to end at 10^7 (~5 min)
    python bench/scale_bench.py --sizes 1e7 1e8       # adds 10^8 (~40 min, ~20 GB of RAM and of disk)

Writes bench/results/scale_bench.json and .md. Two parts:

1. **the id map** at 10^6 ids: bytes held (tracemalloc: what was allocated and is still live) and
   lookup speed of the item table (:mod:`index.items`) against the two Python dicts it replaced;
2. **end to end** at each size N: embedding shards in the batch job's own format (65,536 rows a
   shard; random unit vectors, E = 10, the served width; ids ``item-<row>``), then the job's index
   stage as ``python -m index build`` runs it (:func:`index.job.build_index_from_shards`: training
   sample, IVF training, adds shard by shard, atomic save) with its time and peak memory; load time;
   search throughput (1000-query batches) and one-query latency with recall@10 against exact search
   (computed by streaming the shards through :mod:`index.exact`); get / upsert / remove latency.

Random vectors have no structure for an IVF to exploit, so recall here is a floor for real
embeddings. The machine is shared and noisy: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.timing import best_time  # noqa: E402
from index.exact import top_k_inner_product  # noqa: E402
from index.items import ItemTable, holds  # noqa: E402
from index.job import build_index_from_shards, write_shard  # noqa: E402
from index.sources import Partition  # noqa: E402
from index.store import INDEX_NAME, ITEMS_NAME, VectorIndex  # noqa: E402

RESULTS = REPO / "bench" / "results"
K, DIM, SHARD_ROWS, QUERIES = 10, 10, 65536, 1000
IN_MEMORY_EXACT_MAX = 20_000_000  # above this the vectors do not fit beside the index: exact search streams the shards


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> "PeakMemory":
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


# ---- part 1: the id map ----------------------------------------------------------------------------


def live_bytes(make) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = make()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return made, after - before


def id_map_benchmark(n: int) -> dict:
    def dicts() -> tuple[dict, dict]:  # the previous design: id -> label and label -> id
        label_of = {f"item-{i:09d}": i for i in range(n)}
        return label_of, {label: item_id for item_id, label in label_of.items()}

    def table() -> ItemTable:
        items = ItemTable()
        for start in range(0, n, SHARD_ROWS):  # as the batch job adds them: shard by shard
            items.upsert([f"item-{i:09d}" for i in range(start, min(n, start + SHARD_ROWS))])
        return items

    (label_of, id_of), dict_bytes = live_bytes(dicts)
    items, table_bytes = live_bytes(table)
    rng = np.random.default_rng(0)
    probe_ids = [f"item-{i:09d}" for i in rng.integers(0, n, 1000)]
    probe_labels = rng.integers(0, n, 10_000)
    assert items.labels_of(probe_ids).tolist() == [label_of[i] for i in probe_ids]
    assert items.ids_of(probe_labels) == [id_of[int(i)] for i in probe_labels]
    metadata_part = metadata_benchmark(n)
    return {
        **metadata_part,
        "n": n, "dict_bytes_per_item": dict_bytes / n, "table_bytes_per_item": table_bytes / n,
        "table_build_s": best_time(table, 1), "dict_build_s": best_time(dicts, 1),
        "table_lookup_1000_s": best_time(lambda: items.labels_of(probe_ids)), "dict_lookup_1000_s": best_time(lambda: [label_of[i] for i in probe_ids]),
        "table_lookup_one_s": best_time(lambda: items.labels_of(probe_ids[:1]), 50), "dict_lookup_one_s": best_time(lambda: label_of[probe_ids[0]], 50),
        "table_ids_of_10000_s": best_time(lambda: items.ids_of(probe_labels)), "dict_ids_of_10000_s": best_time(lambda: [id_of[int(i)] for i in probe_labels]),
    }


def metadata_benchmark(n: int) -> dict:
    """Metadata of n items ({"genre": one of 20, "year"}) and a filter that keeps 5 % of them."""
    def meta(i: int) -> dict:
        return {"genre": f"g{i % 20}", "year": 1950 + i % 70}

    def as_dict() -> dict:  # the previous design: id -> metadata object, scanned per filtered search
        return {f"item-{i:09d}": meta(i) for i in range(n)}

    def table() -> ItemTable:
        items = ItemTable()
        for start in range(0, n, SHARD_ROWS):
            rows = range(start, min(n, start + SHARD_ROWS))
            items.upsert([f"item-{i:09d}" for i in rows], [meta(i) for i in rows])
        return items

    by_id, dict_bytes = live_bytes(as_dict)
    items, table_bytes = live_bytes(table)
    where = {"genre": "g7"}
    scan = lambda: {i for i, m in by_id.items() if holds(m, where)}  # noqa: E731
    assert items.ids_of(items.matching(where)) == sorted(scan())
    return {"metadata_dict_bytes_per_item": dict_bytes / n, "metadata_table_bytes_per_item": table_bytes / n,
            "filter_5pct_table_s": best_time(lambda: items.matching(where)), "filter_5pct_dict_scan_s": best_time(scan)}


# ---- part 2: end to end ------------------------------------------------------------------------------


def write_shards(n: int, out: Path) -> list[Partition]:
    """n random unit vectors as embedding shards of the batch job (skipped when already there)."""
    folder = out / "embeddings" / "visual"
    folder.mkdir(parents=True, exist_ok=True)
    partitions = []
    for number, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n - start)
        partition = Partition(f"rows-{start:010d}", rows)
        path = folder / f"{partition.name}.npz"
        if not path.is_file():
            x = np.random.default_rng([7, number]).standard_normal((rows, DIM), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            write_shard(path, x, [f"item-{i}" for i in range(start, start + rows)], None)
        partitions.append(partition)
    return partitions


def exact_truth(out: Path, partitions: list[Partition], queries: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact top-k labels of every query over all shards (streamed), and the seconds it took."""
    start = time.perf_counter()
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    offset = 0
    for p in partitions:
        with np.load(out / "embeddings" / "visual" / f"{p.name}.npz") as z:
            vectors = z["embeddings"]
        s, i = top_k_inner_product(vectors, queries, K)
        both_s, both_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
        keep = np.argsort(-both_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(both_s, keep, 1), np.take_along_axis(both_i, keep, 1)
        offset += p.rows
    return best_i, time.perf_counter() - start


def end_to_end(n: int, work: Path, nlist: int, nprobes: list[int]) -> dict:
    out = work / f"n{n}"
    print(f"[{n:,}] writing shards ...", flush=True)
    partitions = write_shards(n, out)
    shard_bytes = sum(f.stat().st_size for f in (out / "embeddings" / "visual").iterdir())
    factory = f"IVF{nlist},Flat"
    shutil.rmtree(out / "visual", ignore_errors=True)
    print(f"[{n:,}] building {factory} ...", flush=True)
    gc.collect()
    with PeakMemory() as build_memory:
        start = time.perf_counter()
        index = build_index_from_shards(out, "visual", partitions, factory, DIM, "bench", {"nprobe": nprobes[0]})
        build_s = time.perf_counter() - start
    items_bytes = sum(a.nbytes for a in (index.items._id_offsets.values, index.items.alive, index.items._id_bytes.values)) \
        + sum(k.nbytes + r.nbytes for k, r in index.items._runs)
    files = {name: (out / "visual" / name).stat().st_size for name in (INDEX_NAME, ITEMS_NAME)}
    del index
    gc.collect()
    with PeakMemory() as load_memory:
        start = time.perf_counter()
        index = VectorIndex.load(out / "visual")
        load_s = time.perf_counter() - start
    queries = np.random.default_rng(99).standard_normal((QUERIES, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"[{n:,}] exact ground truth ...", flush=True)
    truth, exact_s = exact_truth(out, partitions, queries)
    truth_ids = [set(f"item-{i}" for i in row) for row in truth.tolist()]
    exact_memory_qps = None
    if n <= IN_MEMORY_EXACT_MAX:  # what an exact (Flat) index would serve, all vectors in memory
        vectors = np.concatenate([np.load(out / "embeddings" / "visual" / f"{p.name}.npz")["embeddings"] for p in partitions])
        exact_memory_qps = QUERIES / best_time(lambda: top_k_inner_product(vectors, queries, K), 1)
        del vectors
    rows = []
    for nprobe in nprobes:
        params = {"nprobe": nprobe}
        t_batch = best_time(lambda: index.search(queries, K, params=params), 2)
        single = [best_time(lambda: index.search(q[None], K, params=params), 1) for q in queries[:200]]
        got = index.search(queries, K, params=params)[1]
        rows.append({"nprobe": nprobe, "qps_batch": QUERIES / t_batch, "latency_p50_ms": 1e3 * float(np.median(single)),
                     "latency_p99_ms": 1e3 * float(np.percentile(single, 99)),
                     "recall_at_10": float(np.mean([len(set(g) & t) / K for g, t in zip(got, truth_ids)]))})
    rng = np.random.default_rng(5)
    probe = [f"item-{i}" for i in rng.integers(0, n, 200)]
    get_s = [best_time(lambda: index.get(i), 1) for i in probe]
    new = rng.standard_normal((200, DIM), dtype=np.float32)
    upsert_s = [best_time(lambda: index.upsert(new[j : j + 1], [f"new-{j}"]), 1) for j in range(200)]
    remove_s = [best_time(lambda: index.remove([i]), 1) for i in probe[:50]]
    assert all(i not in index for i in probe[:50]) and f"new-{7}" in index and len(index) == n + 200 - len(set(probe[:50]))
    return {
        "n": n, "factory": factory, "shards": len(partitions), "shard_bytes": shard_bytes, "build_s": build_s,
        "build_peak_rss_bytes": build_memory.peak, "rss_before_build_bytes": build_memory.start,
        "load_s": load_s, "loaded_rss_bytes": load_memory.peak, "files_bytes": files, "item_table_bytes": items_bytes,
        "exact_streamed_s": exact_s, "exact_streamed_qps": QUERIES / exact_s, "exact_in_memory_qps": exact_memory_qps, "search": rows,
        "get_p50_ms": 1e3 * float(np.median(get_s)), "upsert_p50_ms": 1e3 * float(np.median(upsert_s)), "upsert_max_ms": 1e3 * max(upsert_s),
        "remove_p50_ms": 1e3 * float(np.median(remove_s)),
    }


def markdown(report: dict) -> str:
    m = report["id_map"]
    lines = ["# Scale benchmark", "", f"`{report['command']}` on {report['machine']}; {report['date']}.", "",
             f"## The id map at {m['n']:,} ids", "",
             "| | bytes per item | build s | lookup of 1000 ids | one id | ids of 10,000 labels |", "|---|---|---|---|---|---|",
             f"| item table (index/items.py) | {m['table_bytes_per_item']:.0f} | {m['table_build_s']:.2f} | {m['table_lookup_1000_s'] * 1e3:.2f} ms | "
             f"{m['table_lookup_one_s'] * 1e6:.0f} µs | {m['table_ids_of_10000_s'] * 1e3:.2f} ms |",
             f"| two Python dicts (before) | {m['dict_bytes_per_item']:.0f} | {m['dict_build_s']:.2f} | {m['dict_lookup_1000_s'] * 1e3:.2f} ms | "
             f"{m['dict_lookup_one_s'] * 1e6:.1f} µs | {m['dict_ids_of_10000_s'] * 1e3:.2f} ms |", "",
             f"The table holds {m['dict_bytes_per_item'] / m['table_bytes_per_item']:.1f}× fewer bytes per item (ids of 14 characters)."]
    if "filter_5pct_table_s" in m:
        lines += ["", f"With metadata `{{\"genre\": one of 20, \"year\": int}}` on every item: {m['metadata_table_bytes_per_item']:.0f} B/item in the table "
                  f"(ids included) against {m['metadata_dict_bytes_per_item']:.0f} in a dict of metadata objects; the filter `{{\"genre\": \"g7\"}}` (5 % of the items) "
                  f"takes {m['filter_5pct_table_s'] * 1e3:.0f} ms on the table against {m['filter_5pct_dict_scan_s'] * 1e3:.0f} ms for a scan of the dict."]
    for r in report["end_to_end"]:
        gb = 1e9
        lines += ["", f"## {r['n']:,} items, {r['factory']}, random unit vectors, E = {DIM} (`{report.get('end_to_end_command', report['command'])}`)", "",
                  f"Batch job index stage ({r['shards']} shards, {r['shard_bytes'] / gb:.1f} GB): **{r['build_s']:.0f} s**, peak RSS {r['build_peak_rss_bytes'] / gb:.1f} GB "
                  f"(from {r['rss_before_build_bytes'] / gb:.1f}). Files: index.faiss {r['files_bytes'][INDEX_NAME] / gb:.2f} GB, items.bin {r['files_bytes'][ITEMS_NAME] / gb:.2f} GB "
                  f"(item table in memory {r['item_table_bytes'] / r['n']:.0f} B/item). Load {r['load_s']:.1f} s, RSS after load {r['loaded_rss_bytes'] / gb:.1f} GB. "
                  f"Exact search of the {QUERIES} queries, streamed from the shards: {r['exact_streamed_s']:.1f} s ({r['exact_streamed_qps']:.0f} QPS)"
                  + (f"; in memory (the vectors in one array, as a Flat index holds them): {r['exact_in_memory_qps']:.0f} QPS." if r.get("exact_in_memory_qps") else
                     " (the vectors do not fit in memory beside the index)."), "",
                  "| nprobe | recall@10 | batch QPS | × exact in memory | × exact streamed | p50 ms (1 query) | p99 ms |", "|---|---|---|---|---|---|---|"]
        for s in r["search"]:
            in_memory = f"{s['qps_batch'] / r['exact_in_memory_qps']:.0f}" if r.get("exact_in_memory_qps") else "-"
            lines.append(f"| {s['nprobe']} | {s['recall_at_10']:.3f} | {s['qps_batch']:.0f} | {in_memory} | {s['qps_batch'] / r['exact_streamed_qps']:.0f} | "
                         f"{s['latency_p50_ms']:.2f} | {s['latency_p99_ms']:.2f} |")
        lines += ["", f"Item changes at this size (p50): get {r['get_p50_ms']:.3f} ms, upsert of one new item {r['upsert_p50_ms']:.3f} ms "
                  f"(max {r['upsert_max_ms']:.0f} ms: a merge of the lookup runs), remove {r['remove_p50_ms']:.3f} ms."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", type=float, default=[1e7], help="collection sizes for the end-to-end part (none: keep the saved results)")
    parser.add_argument("--id-map-items", type=float, default=1e6)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-scale-bench"), help="shards and indexes (kept: a rerun reuses the shards)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    report = {"command": "python " + " ".join(["bench/scale_bench.py", *sys.argv[1:]]), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("id map ...", flush=True)
    report["id_map"] = id_map_benchmark(int(args.id_map_items))
    report["end_to_end"] = [end_to_end(int(n), args.work, nlist=4096, nprobes=[4, 8, 16, 32, 64]) for n in args.sizes]
    if not args.sizes and (out / "scale_bench.json").is_file():  # --sizes with no value: re-measure the id map only
        earlier = json.loads((out / "scale_bench.json").read_text())
        report["end_to_end"], report["end_to_end_command"] = earlier["end_to_end"], earlier.get("end_to_end_command", earlier["command"])
    report.setdefault("end_to_end_command", report["command"])
    (out / "scale_bench.json").write_text(json.dumps(report, indent=2))
    (out / "scale_bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
