"""Write benchmark: item upserts and deletes through HTTP against a real ``python -m service serve``.

Per size N (10^5, 10^6, optionally 10^7) and index type (Flat, HNSW32): an audio index of N random
unit embeddings (the model's width) is written as a snapshot, the server started on it, then
single-item upserts (1 and 16 clients) and deletes of those items (16 and 1 clients) are timed:
throughput, p50 and p99. Folding into snapshots is on (every ``--snapshot-seconds``) so the figures
include it. Bulk loading: ``--bulk`` items upserted in batches of 1000 by 4 clients into an empty
Flat index, timed per tenth: linear in N means every tenth takes the same time.

Worker processes (issue 22): ``bench/write_workers_ab.py`` compares 1 and 2 workers with both
servers up at once (one after the other, this VM's drift exceeded the difference measured).

    python bench/write_bench.py                                      # 10^5 and 10^6, Flat and HNSW32, bulk 10^6

Setup: the ``tiny`` preset trained on the synthetic default and exported (cached in ``--work``):
the write path does not depend on the model's quality. Results: ``bench/results/write_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.http_bench import commit, free_port, read_response, start, stop  # noqa: E402
from bench.server_tree import stop_tree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
AUDIO_DIM = 128


def tiny_model(work: Path) -> Path:
    py = sys.executable
    if not (work / "run" / "checkpoint.pt").is_file():
        subprocess.run([py, "-m", "training", "train", "--config", "tiny", "--data", "synthetic", "--out", str(work / "run"), "--quiet"], cwd=REPO, check=True)
    if not (work / "model" / "manifest.json").is_file():
        subprocess.run([py, "-m", "training", "export", "--run", str(work / "run"), "--out", str(work / "model")], cwd=REPO, check=True)
    return work / "model"


def build_index(model: Path, work: Path, n: int, factory: str, visual: tuple[int, str] = (1000, "Flat"), copy: str = "") -> tuple[Path, float]:
    """An index directory with ``n`` random audio items and ``visual`` (count, factory) visual ones, and its build seconds.

    Built once per (model, n, factory) under ``work`` (10^7 HNSW32 takes half an hour here) and
    copied for each run, since the server writes its snapshots into the directory it serves. The
    copy replaces the last one of that name: servers up at once each need their own ``copy`` name.
    """
    from index.embedder import load_manifest
    from index.store import VectorIndex

    manifest, manifest_hash = load_manifest(model)
    name = f"{factory.replace(',', '_')}-{n}" + ("" if visual == (1000, "Flat") else f"-visual-{visual[1].replace(',', '_')}-{visual[0]}")
    built = work / f"built-{manifest_hash[:12]}-{name}"
    if not (built / "build.json").is_file():
        dim = int(manifest["embedding_dim"])
        shutil.rmtree(built, ignore_errors=True)
        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for modality, (count, modality_factory) in (("audio", (n, factory)), ("visual", visual)):
            x = rng.standard_normal((count, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            index = VectorIndex.build(x, [f"base-{i}" for i in range(count)], factory=modality_factory, manifest_hash=manifest_hash)
            index.save(built / modality)
            del index, x
        (built / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    served = work / f"index-{name}{copy}"
    shutil.rmtree(served, ignore_errors=True)
    shutil.copytree(built, served)
    return served, json.loads((built / "build.json").read_text())["seconds"]


def upsert_request(item_ids: list[str], rng: np.random.Generator) -> bytes:
    vectors = rng.standard_normal((len(item_ids), AUDIO_DIM)).round(4)
    body = json.dumps({"items": [{"id": i, "vector": v.tolist(), "metadata": {"bench": 1}} for i, v in zip(item_ids, vectors)]}).encode()
    return f"POST /v1/items/audio HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def search_request(rng: np.random.Generator) -> bytes:
    """Audio features against the audio index: the one the writes change."""
    body = json.dumps({"modality": "audio", "target": "audio", "top_k": 10, "vectors": [rng.standard_normal(AUDIO_DIM).round(4).tolist()]}).encode()
    return f"POST /v1/search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def delete_request(item_id: str) -> bytes:
    return f"DELETE /v1/items/audio/{item_id} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


async def run_requests(port: int, requests: list[bytes], clients: int, duration: float, processes: int = 1) -> dict:
    """Closed loop: each client sends the next unused request when its previous answer arrived.
    ``processes`` > 1: the connections are spread evenly over that many server processes."""
    connections = await even_connections(port, clients, processes) if processes > 1 else [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    position = 0
    started = time.perf_counter()

    async def client(c: int) -> None:
        nonlocal position
        reader, writer = connections[c]
        while position < len(requests) and time.perf_counter() - started < duration:
            request = requests[position]
            position += 1
            t = time.perf_counter()
            writer.write(request)
            status, _ = await read_response(reader)
            latencies.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - started
    for _, writer in connections:
        writer.close()
    return {"clients": clients, "seconds": round(elapsed, 3), **latency_summary(latencies, len(latencies) - statuses.get(200, 0), elapsed)}


async def even_connections(port: int, clients: int, processes: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``clients`` keep-alive connections, ``clients / processes`` held by each server process (the
    kernel's SO_REUSEPORT hash picks one per connection; ``ss`` says which): a diagnostic that takes
    the uneven split out of a multi-worker figure (bench/connection_split.py)."""
    share = -(-clients // processes)
    held: collections.Counter[str] = collections.Counter()
    kept = []
    for _ in range(clients * 50):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await read_response(reader)  # accepted: a worker holds it
        local = writer.get_extra_info("sockname")[1]
        table = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} and dport = :{local} )"], capture_output=True, text=True, check=True).stdout
        pid = re.search(r"pid=(\d+)", table).group(1)
        if held[pid] < share:
            held[pid] += 1
            kept.append((reader, writer))
            if len(kept) == clients:
                return kept
        else:
            writer.close()
    raise RuntimeError(f"could not spread {clients} connections evenly over {processes} processes")


def latency_summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    lat = np.array(latencies or [np.nan]) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(np.max(lat)), 2),
    }


async def run_alternating(port: int, writes: list[bytes], searches: list[bytes], duration: float) -> dict:
    """One client: a write, then a search, and so on; the searches' latencies (each follows a write)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies, errors, started = [], 0, time.perf_counter()
    for write, search in zip(writes, searches):
        if time.perf_counter() - started >= duration:
            break
        writer.write(write)
        errors += (await read_response(reader))[0] != 200
        t = time.perf_counter()
        writer.write(search)
        errors += (await read_response(reader))[0] != 200
        latencies.append(time.perf_counter() - t)
    writer.close()
    return latency_summary(latencies, errors, time.perf_counter() - started)


def serve(model: Path, index: Path, snapshot_seconds: float, workers: int = 1, env: dict[str, str] | None = None, launcher: tuple[str, ...] = ("-m", "service")) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        "OMP_NUM_THREADS": "1",
        "AVSEARCH_WORKERS": str(workers),
        "AVSEARCH_WAL_SNAPSHOT_SECONDS": str(snapshot_seconds),
        "AVSEARCH_MAX_VECTORS": "1000",
        "AVSEARCH_ACCESS_LOG": "false",
        **(env or {}),
    }
    cmd = [sys.executable, *launcher, "serve", "--model", str(model), "--index", str(index), "--port", str(port)]
    return start(cmd, port, env, timeout=1800), port


def fold_mode() -> str:
    """How the server copies the index for a fold (AVSEARCH_WAL_FOLD_FORK, passed on to it)."""
    return "copy" if os.environ.get("AVSEARCH_WAL_FOLD_FORK", "true").strip().lower() in ("false", "0", "no", "off") else "fork"


def point(model: Path, work: Path, n: int, factory: str, args) -> dict:
    index, build_s = build_index(model, work, n, factory)
    load_started = time.perf_counter()
    proc, port = serve(model, index, args.snapshot_seconds)
    row: dict = {"items": n, "factory": factory, "build_s": round(build_s, 1), "start_s": round(time.perf_counter() - load_started, 1), "snapshot_seconds": args.snapshot_seconds, "fold": fold_mode()}
    try:
        rng = np.random.default_rng(n)
        ids = [f"new-{i}" for i in range(args.max_requests)]
        upserts = [upsert_request([i], rng) for i in ids]
        one = asyncio.run(run_requests(port, upserts[: args.max_requests // 4], 1, args.duration))
        many = asyncio.run(run_requests(port, upserts[one["requests"] :], 16, args.duration))
        written = ids[: one["requests"] + many["requests"]]
        deletes = [delete_request(i) for i in written]
        del_one = asyncio.run(run_requests(port, deletes[: len(deletes) // 4], 1, args.duration))
        del_many = asyncio.run(run_requests(port, deletes[del_one["requests"] :], 16, args.duration))
        searches = [search_request(rng) for _ in range(args.max_requests // 4)]
        alone = asyncio.run(run_requests(port, searches, 1, args.duration))
        mixed_ids = [f"mixed-{i}" for i in range(len(searches))]
        after_write = asyncio.run(run_alternating(port, [upsert_request([i], rng) for i in mixed_ids], searches, args.duration))
        row.update({"upsert_1": one, "upsert_16": many, "delete_16": del_many, "delete_1": del_one, "search_1": alone, "search_after_write": after_write})
    finally:
        row["outlived_primary"] = stop_tree(proc)  # processes of its tree still there 10 s after the primary exited (killed)
        shutil.rmtree(index, ignore_errors=True)
    row["load_average_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(row), flush=True)
    return row


def bulk(model: Path, work: Path, total: int, args) -> dict:
    index, _ = build_index(model, work, 1, "Flat")
    proc, port = serve(model, index, snapshot_seconds=300)  # the default: folds by size, in proportion to the snapshot
    try:
        rng = np.random.default_rng(1)
        tenth = total // 10
        per_tenth = []
        for t in range(10):
            requests = [upsert_request([f"bulk-{t}-{b}-{j}" for j in range(1000)], rng) for b in range(tenth // 1000)]
            result = asyncio.run(run_requests(port, requests, 4, 1e9))
            assert result["errors"] == 0, result
            per_tenth.append({"loaded_after": (t + 1) * tenth, "items_per_s": round(tenth / result["seconds"], 1), "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"]})
            print(json.dumps(per_tenth[-1]), flush=True)
    finally:
        stop(proc)
        shutil.rmtree(index, ignore_errors=True)
    rates = [p["items_per_s"] for p in per_tenth]
    return {"items": total, "batch": 1000, "clients": 4, "tenths": per_tenth, "last_over_first_tenth_rate": round(rates[-1] / rates[0], 2)}


def point_key(row: dict) -> tuple:
    return row["items"], row["factory"], row.get("snapshot_seconds", 0), row.get("fold", "fork")


def write_results(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "write_bench.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Write benchmark (`bench/write_bench.py`)",
        "",
        f"{out['machine']}; model: {out['model']}; each write is in the write-ahead log (fsynced, group commit) before its answer; "
        "snapshots folded every `fold every s` during the runs, the index copied for a fold by a forked writer (`fork`) or in memory (`copy`, AVSEARCH_WAL_FOLD_FORK=false). Single-item upserts of 128-d audio features (JSON), then deletes of those items, "
        f"each phase {out['duration']} s. `start s`: from launching `serve` to its first answer (loading the index and making room for writes).",
        "",
        "| items | index | upsert 1 client p50 / p99 / max ms | upserts/s 16 clients | p50 / p99 / max ms | deletes/s 16 clients | p50 / p99 ms | delete 1 client p50 / p99 ms | search p50 / p99 ms | search after a write p50 / p99 ms | fold every s (how) | start s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["points"]:
        u1, u16, d16, d1 = r["upsert_1"], r["upsert_16"], r["delete_16"], r["delete_1"]
        s1, sw = r.get("search_1", {}), r.get("search_after_write", {})
        lines.append(
            f"| {r['items']:.0e} | {r['factory']} | {u1['p50_ms']} / {u1['p99_ms']} / {u1.get('max_ms', '')} | {u16['per_s']} | {u16['p50_ms']} / {u16['p99_ms']} / {u16.get('max_ms', '')} | "
            f"{d16['per_s']} | {d16['p50_ms']} / {d16['p99_ms']} | {d1['p50_ms']} / {d1['p99_ms']} | {s1.get('p50_ms', '')} / {s1.get('p99_ms', '')} | "
            f"{sw.get('p50_ms', '')} / {sw.get('p99_ms', '')} | {r.get('snapshot_seconds', '')} ({r.get('fold', 'fork')}) | {r['start_s']} | {r['load_average_1min']} |"
        )
    if out.get("bulk"):
        b = out["bulk"]
        lines += ["", f"Bulk load: {b['items']:,} items in batches of {b['batch']} by {b['clients']} clients into an empty Flat index, default fold thresholds; items/s per tenth "
                  f"(linear in N = a flat rate; last tenth / first: {b['last_over_first_tenth_rate']}):", "",
                  "| loaded | items/s | p50 / p99 ms per batch |", "|---|---|---|"]
        lines += [f"| {t['loaded_after']:,} | {t['items_per_s']} | {t['p50_ms']} / {t['p99_ms']} |" for t in b["tenths"]]
    lines += ["", *out.get("notes", [])]
    (RESULTS / "write_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"])
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--max-requests", type=int, default=12000)
    parser.add_argument("--bulk", type=float, default=1e6, help="items to bulk-load (0: skip)")
    parser.add_argument("--snapshot-seconds", type=float, default=3.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"))
    parser.add_argument("--note", action="append", default=[], help="a line added under the tables")
    parser.add_argument("--append", action="store_true", help="add to the points (and keep the bulk figures) of the existing results")
    parser.add_argument("--sizes-none", dest="no_points", action="store_true", help="only the bulk load")
    args = parser.parse_args()
    model = tiny_model(args.work)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "model": "tiny preset (embedding width 8)",
        "duration": args.duration,
        "points": [],
        "notes": args.note,
    }
    if args.append and (RESULTS / "write_bench.json").is_file():
        previous = json.loads((RESULTS / "write_bench.json").read_text())
        out["points"], out["notes"] = previous["points"], previous.get("notes", []) + args.note
        out["bulk"] = previous.get("bulk")
    for n in [] if args.no_points else args.sizes:
        for factory in args.factories:
            row = point(model, args.work, int(n), factory, args)
            out["points"] = [r for r in out["points"] if point_key(r) != point_key(row)] + [row]  # a re-run replaces its point
            out["points"].sort(key=point_key)
            write_results(out)
    if args.bulk:
        out["bulk"] = bulk(model, args.work, int(args.bulk), args)
    print(f"results: {RESULTS / 'write_bench.md'}")
    write_results(out)


if __name__ == "__main__":
    main()
