"""HTTP benchmark of the search service against a naive baseline, on real uvicorn processes (127.0.0.1 only).

    python bench/http_bench.py                 # 10^5-item gallery, 5 s per phase (~4 min after the one-off setup)
    python bench/http_bench.py --quick         # 10^4 items, 2 s per phase

Setup (cached in --work): train the default preset on the synthetic default (``python -m training
train --config default``), export it, generate N synthetic clips with the same generator and index
them (audio and visual, exact Flat). Then, for each server, one at a time: the service
(``python -m service serve``, JSON and .npy bodies) and the naive baseline (bench/naive_server.py:
PyTorch eager, no batching, numpy brute force), closed-loop load from 1, 8 and 64 concurrent
clients, each client one keep-alive connection sending one audio query (top 10 visual clips) per
request and waiting for the answer. The load generator is a small asyncio HTTP/1.1 client in this
process: it shares the machine's cores with the server, so the figures are a floor for the server.
Writes bench/results/http_bench.json and http_bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.trained import trained_default_model  # noqa: E402

RESULTS = REPO / "bench" / "results"
TOP_K = 10
TARGETS = {"throughput_64": 1000.0, "p99_64_ms": 50.0, "ratio_vs_naive": 3.0, "p50_1_ms": 5.0}


def prepare(work: Path, n_items: int) -> dict:
    """Model, index and gallery embeddings (cached); returns a description of what was built."""
    from index.embedder import Embedder
    from index.store import VectorIndex
    from training.config import load_config
    from avdata.synthetic import generate

    embedder = Embedder(trained_default_model(work), device="cpu")
    card = {"n_items": n_items, "model": embedder.manifest_hash[:12]}
    card_path = work / "gallery" / "card.json"
    if not card_path.is_file() or json.loads(card_path.read_text()) != card:
        shutil.rmtree(work / "gallery", ignore_errors=True)
        shutil.rmtree(work / "index", ignore_errors=True)
        cfg = load_config("default").synthetic
        cfg.n_clips = n_items
        print(f"generating and embedding {n_items} synthetic clips", flush=True)
        data = generate(cfg)
        (work / "gallery").mkdir(parents=True)
        for modality in ("audio", "visual"):
            features = getattr(data, modality)
            embeddings = np.concatenate([embedder.embed(modality, features[i : i + 8192]) for i in range(0, len(features), 8192)])
            np.save(work / "gallery" / f"{modality}_embeddings.npy", embeddings)
            VectorIndex.build(embeddings, data.ids, "Flat", embedder.manifest_hash).save(work / "index" / modality)
        (work / "gallery" / "ids.txt").write_text("\n".join(data.ids))
        rows = np.random.default_rng(0).choice(len(data), 512, replace=False)
        np.save(work / "gallery" / "queries.npy", data.audio[rows])
        card_path.write_text(json.dumps(card))
    return {**card, "embedding_dim": embedder.embedding_dim, "model_source": "default preset trained on the synthetic default (python -m training train --config default)"}


def commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes): the code the figures measured."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, env: dict | None = None, timeout: float = 300) -> subprocess.Popen:
    """The server, once /readyz answers 200. Its log goes to a file (``proc.log_path``), not a pipe:
    a pipe nobody reads fills up (64 KB) and then stops every thread of the server that logs."""
    log_file = tempfile.NamedTemporaryFile("w", prefix=f"avsearch-bench-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    log_file.close()
    proc.log_path = Path(log_file.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {proc.log_path.read_text()[-2000:]}")
        try:
            status, _ = asyncio.run(one_request(port, f"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()))
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return int(head[9:12]), body


async def one_request(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await read_response(reader)
    finally:
        writer.close()


def search_body(query: np.ndarray, binary: bool, modality: str = "audio") -> tuple[str, str, bytes]:
    """(path, content type, body) of a search for one ``query`` (top ``TOP_K`` of the other modality)."""
    if binary:
        buffer = io.BytesIO()
        np.save(buffer, query[None].astype(np.float32))
        return f"/v1/search?modality={modality}&top_k={TOP_K}", "application/x-npy", buffer.getvalue()
    body = json.dumps({"modality": modality, "vectors": [[round(float(v), 6) for v in query]], "top_k": TOP_K}).encode()
    return "/v1/search", "application/json", body


def http_requests(queries: np.ndarray, binary: bool, modality: str = "audio") -> list[bytes]:
    out = []
    for q in queries:
        path, ctype, body = search_body(q, binary, modality)
        out.append(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return out


async def closed_loop(port: int, requests: list[bytes], clients: int, warmup: float, duration: float, max_requests: int) -> dict:
    """``clients`` connections, each sending its next request when the previous answer arrived."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    measure_from, stop_at = t0 + warmup, t0 + warmup + duration

    async def client(c: int) -> None:
        reader, writer = connections[c]
        i = c * 7
        while True:
            now = time.perf_counter()
            if now >= stop_at or len(latencies) >= max_requests:
                return
            writer.write(requests[i % len(requests)])
            i += 1
            status, _ = await read_response(reader)
            done = time.perf_counter()
            if now >= measure_from:
                latencies.append(done - now)
                statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = min(time.perf_counter(), stop_at) - measure_from
    for _, writer in connections:
        writer.close()
    lat = np.array(latencies) * 1000
    ok = statuses.get(200, 0)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(latencies) - ok,
        "throughput_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "mean_ms": round(float(lat.mean()), 2),
    }


def batch_stats(port: int) -> tuple[float, float]:
    _, body = asyncio.run(one_request(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"))
    text = body.decode()
    total = float(re.search(r"avsearch_batch_requests_sum ([\d.e+]+)", text).group(1))
    count = float(re.search(r"avsearch_batch_requests_count ([\d.e+]+)", text).group(1))
    return total, count


def measure(name: str, port: int, requests: list[bytes], clients: int, args, with_batches: bool) -> dict:
    before = batch_stats(port) if with_batches else None
    row = asyncio.run(closed_loop(port, requests, clients, args.warmup, args.duration, args.max_requests))
    if with_batches:
        after = batch_stats(port)
        row["mean_batch_requests"] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)
    row["server"] = name
    row["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine, at the end of the phase
    print(json.dumps(row), flush=True)
    return row


def http_stack() -> str:
    import importlib.util

    present = [m for m in ("uvloop", "httptools", "orjson") if importlib.util.find_spec(m) is not None]
    return " + ".join(present) if present else "asyncio + h11 + json (uvloop, httptools, orjson not installed)"


def write_results(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "http_bench.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# HTTP search benchmark",
        "",
        f"`{out['command']}` on {out['machine']}; {out['setup']['n_items']:,} items per modality, embedding width "
        f"{out['setup']['embedding_dim']}, model {out['setup']['model']} ({out['setup']['model_source']}). One audio query per "
        f"request, top {TOP_K} visual clips, exact search. Closed loop: each client sends its next request when the answer arrives. "
        "The asyncio load generator shares the cores with the server. Phases are interleaved per concurrency (naive, service JSON, service .npy), both servers up. "
        "Load average at start: " + str(out["load_average_at_start"]),
        "",
        "| server | body | clients | searches/s | p50 ms | p99 ms | errors | mean requests per batch | load avg after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out["rows"]:
        server, body = row["server"].split(" ", 1)
        lines.append(
            f"| {server} | {body} | {row['clients']} | {row['throughput_per_s']:,.0f} | {row['p50_ms']} | {row['p99_ms']} | {row['errors']} | {row.get('mean_batch_requests', '-')} | {row['load_average_1min']} |"
        )
    lines += ["", "| ratio service JSON / naive JSON (same run) | 1 client | 8 clients | 64 clients |", "|---|---:|---:|---:|"]
    lines.append("| throughput | " + " | ".join(f"{out['ratios'][str(c)]:.1f}×" for c in (1, 8, 64)) + " |")
    lines += [
        "",
        "Service: `python -m service serve` with default settings (micro-batch window 0.2 ms, 1 FAISS/BLAS thread, 1 ONNX Runtime "
        f"thread), uvicorn with {out['http_stack']}. Naive baseline (bench/naive_server.py): FastAPI + pydantic models, PyTorch "
        "eager encoders of the same checkpoint, one request at a time (sync handler in FastAPI's thread pool), numpy matrix-vector "
        "product + argpartition over the gallery embeddings, 1 torch and 1 BLAS thread, same uvicorn stack. The machine is shared "
        "with other jobs: compare the ratios measured in this run rather than absolute figures across runs.",
    ]
    lines += ["", "Targets: " + ", ".join(f"{k} {'✓' if v['met'] else '✗'} ({v['value']} vs {v['target']})" for k, v in out["targets"].items())]
    (RESULTS / "http_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per phase")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-http-bench"))
    parser.add_argument("--quick", action="store_true", help="10^4 items, 2 s phases")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.items, args.duration = 10_000, 2.0
    try:
        import uvloop

        uvloop.install()  # the client too: it shares the cores
    except ImportError:
        pass
    setup = prepare(args.work, args.items)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    queries = np.load(args.work / "gallery" / "queries.npy")
    rows = []
    # Both servers up at once (the idle one costs nothing), phases interleaved per concurrency: the
    # service and the baseline are measured seconds apart, under the same load from other jobs.
    service_port, servers = free_port(), []
    try:
        servers.append(start([sys.executable, "-m", "service", "serve", "--model", str(args.work / "model"), "--index", str(args.work / "index"), "--port", str(service_port)], service_port))
        if not args.skip_naive:
            naive_port = free_port()
            servers.append(start([sys.executable, "bench/naive_server.py", "--run", str(args.work / "run"), "--gallery", str(args.work / "gallery"), "--port", str(naive_port)], naive_port))
        as_json, as_npy = http_requests(queries, binary=False), http_requests(queries, binary=True)
        for clients in (1, 8, 64):
            if not args.skip_naive:
                rows.append(measure("naive JSON", naive_port, as_json, clients, args, with_batches=False))
            rows.append(measure("service JSON", service_port, as_json, clients, args, with_batches=True))
            rows.append(measure("service .npy", service_port, as_npy, clients, args, with_batches=True))
    finally:
        for proc in servers:
            stop(proc)
    by = {(r["server"], r["clients"]): r for r in rows}
    ratios = {str(c): by[("service JSON", c)]["throughput_per_s"] / by[("naive JSON", c)]["throughput_per_s"] for c in (1, 8, 64) if ("naive JSON", c) in by}
    s64, s1 = by[("service JSON", 64)], by[("service JSON", 1)]
    targets = {
        "throughput_64_json": {"value": s64["throughput_per_s"], "target": TARGETS["throughput_64"], "met": s64["throughput_per_s"] >= TARGETS["throughput_64"] and s64["errors"] == 0},
        "p99_64_json_ms": {"value": s64["p99_ms"], "target": TARGETS["p99_64_ms"], "met": s64["p99_ms"] <= TARGETS["p99_64_ms"]},
        "ratio_vs_naive_64": {"value": round(ratios.get("64", 0.0), 2), "target": TARGETS["ratio_vs_naive"], "met": ratios.get("64", 0.0) >= TARGETS["ratio_vs_naive"]},
        "p50_1_client_json_ms": {"value": s1["p50_ms"], "target": TARGETS["p50_1_ms"], "met": s1["p50_ms"] <= TARGETS["p50_1_ms"]},
    }
    out = {
        "command": "python bench/http_bench.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_at_start": load_at_start,
        "setup": setup,
        "http_stack": http_stack(),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "top_k": TOP_K},
        "rows": rows,
        "ratios": {k: round(v, 2) for k, v in ratios.items()},
        "targets": targets,
    }
    if ratios:
        write_results(out)
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
