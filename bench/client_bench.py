"""Client benchmark: the Python client (client/) against hand-made httpx calls, on a real ``serve``.

    python bench/client_bench.py              # ~2 min after the one-off setup (tiny model, 10^5-item index)

Search: one audio query (128 features, top 10 of a 10^5-item Flat audio index) per request, for
``--duration`` seconds per variant, with 1 caller (sync) and 16 concurrent callers (asyncio tasks
sharing one connection pool): the client's ``.npy`` path (its default) and JSON path
(``binary=False``) against a hand-made ``httpx`` call of each kind (build the body, post, index into
the answer). The callers run in this process and share the 2 cores with the server, so what the
client costs shows in both latency and throughput.

Bulk upsert: ``--bulk`` new items (128 features, small metadata) in batches of 1000, through
``Client.upsert`` (1 request at a time, and ``concurrency=4``; and 4 ``AsyncClient`` callers), with and without orjson (the ``fast``
extra), against the server's own write benchmark's bulk load (bench/write_bench.py: the same
batches, pre-encoded before the clock starts, sent by 4 raw-socket clients) in the same run.

Setup: bench/write_bench.py's tiny model and index (cached in ``--work``). Results:
bench/results/client_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "client"))  # the checkout's client, installed or not
import httpx  # noqa: E402

from avsearch_client import AsyncClient, Client, wire  # noqa: E402
from bench.http_bench import stop  # noqa: E402
from bench.timing import best_time  # noqa: E402
from bench.write_bench import AUDIO_DIM, build_index, latency_summary, run_requests, serve, tiny_model, upsert_request  # noqa: E402

RESULTS = REPO / "bench" / "results"
TOP_K, BATCH = 10, 1000


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


PARAMS = {"modality": "audio", "target": "audio", "top_k": TOP_K}


def hand_made(q: np.ndarray, binary: bool) -> dict:
    """What a user writes without the client: the request's arguments for ``httpx.post``."""
    if binary:
        return {"params": PARAMS, "content": npy(q[None]), "headers": {"Content-Type": "application/x-npy"}}
    return {"json": {**PARAMS, "vectors": [q.tolist()]}}


def top_ids(answer: dict) -> list[str]:
    return [h["id"] for h in answer["results"][0]]


def sync_caller(kind: str, binary: bool, url: str, transport: httpx.BaseTransport | None = None):
    if kind == "client":
        client = Client(url)
        if transport is not None:  # the overhead measurement: the same client over an in-memory server
            client._http = httpx.Client(base_url=url, transport=transport)
        return lambda q: client.search("audio", q, top_k=TOP_K, target="audio", binary=binary)[0].ids.tolist()
    raw = httpx.Client(base_url=url, transport=transport)
    return lambda q: top_ids(raw.post("/v1/search", **hand_made(q, binary)).json())


def async_caller(kind: str, binary: bool, url: str):
    """Made inside the event loop that uses it (a connection pool belongs to one loop)."""
    if kind == "client":
        client = AsyncClient(url)

        async def call(q):
            return (await client.search("audio", q, top_k=TOP_K, target="audio", binary=binary))[0].ids.tolist()

        return call
    raw = httpx.AsyncClient(base_url=url)

    async def call_raw(q):
        return top_ids((await raw.post("/v1/search", **hand_made(q, binary))).json())

    return call_raw


def time_sync(call, queries: np.ndarray, duration: float) -> tuple[list[float], float]:
    """(latencies, elapsed seconds) of back-to-back calls for ``duration`` seconds."""
    latencies, started, i = [], time.perf_counter(), 0
    while time.perf_counter() - started < duration:
        t = time.perf_counter()
        call(queries[i % len(queries)])
        latencies.append(time.perf_counter() - t)
        i += 1
    return latencies, time.perf_counter() - started


async def time_async(kind: str, binary: bool, url: str, queries: np.ndarray, duration: float, callers: int) -> tuple[list[float], float]:
    call = async_caller(kind, binary, url)
    await asyncio.gather(*(call(queries[c]) for c in range(callers)))  # open the pool's connections first
    latencies: list[float] = []
    started = time.perf_counter()

    async def caller(c: int) -> None:
        i = c
        while time.perf_counter() - started < duration:
            t = time.perf_counter()
            await call(queries[i % len(queries)])
            latencies.append(time.perf_counter() - t)
            i += callers

    await asyncio.gather(*(caller(c) for c in range(callers)))
    return latencies, time.perf_counter() - started


VARIANTS = {"httpx JSON (hand-made)": ("httpx", False), "client JSON": ("client", False), "httpx .npy (hand-made)": ("httpx", True), "client .npy": ("client", True)}


def bench_search(url: str, duration: float, rounds: int) -> dict:
    """Each variant ``rounds`` times in turn (duration / rounds seconds each): a shared machine's
    drift falls on every variant alike."""
    queries = np.random.default_rng(0).standard_normal((256, AUDIO_DIM)).astype(np.float32)
    reference = sync_caller("httpx", False, url)
    calls = {name: sync_caller(kind, binary, url) for name, (kind, binary) in VARIANTS.items()}
    for call in calls.values():
        assert all(call(q) == reference(q) for q in queries[:8])  # the same answers; warm connections
    pooled: dict = {name: {"1": ([], 0.0), "16": ([], 0.0)} for name in VARIANTS}
    for _ in range(rounds):
        for name, (kind, binary) in VARIANTS.items():
            for callers, (lat, seconds) in (("1", time_sync(calls[name], queries, duration / rounds)), ("16", asyncio.run(time_async(kind, binary, url, queries, duration / rounds, 16)))):
                pooled[name][callers] = (pooled[name][callers][0] + lat, pooled[name][callers][1] + seconds)
    out = {name: {c: latency_summary(lat, 0, seconds) for c, (lat, seconds) in by.items()} for name, by in pooled.items()}
    for name, figures in out.items():
        print(name, json.dumps(figures), flush=True)
    return out


def bench_overhead(calls_per_variant: int = 2000) -> dict:
    """Microseconds a call costs in this process over an in-memory transport (no server, no socket):
    what the client adds to a hand-made httpx call, free of the server's and the machine's noise."""
    answer = json.dumps({"results": [[{"id": f"base-{i}", "score": 0.5, "metadata": None} for i in range(TOP_K)]], "model": "x"}).encode()
    info = json.dumps({"model": "x", "limits": {"max_vectors": 1000, "max_top_k": 1000, "max_body_bytes": 1 << 25}}).encode()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=info if request.url.path == "/v1/info" else answer, headers={"Content-Type": "application/json"}))
    q = np.random.default_rng(2).standard_normal(AUDIO_DIM).astype(np.float32)
    out = {}
    for name, (kind, binary) in VARIANTS.items():
        call = sync_caller(kind, binary, "http://in-memory", transport)
        call(q)

        def run() -> None:
            for _ in range(calls_per_variant):
                call(q)

        out[name] = round(best_time(run) / calls_per_variant * 1e6, 1)
    print("overhead us", json.dumps(out), flush=True)
    return out


def bench_batch(url: str, duration: float, rows: int) -> dict:
    """One call of ``rows`` queries (one request): where the .npy body pays off."""
    queries = np.random.default_rng(1).standard_normal((rows, AUDIO_DIM)).astype(np.float32)
    client, raw = Client(url), httpx.Client(base_url=url)
    calls = {
        "httpx JSON (hand-made)": lambda: raw.post("/v1/search", json={**PARAMS, "vectors": queries.tolist()}).json()["results"],
        "client JSON": lambda: client.search("audio", queries, top_k=TOP_K, target="audio", binary=False),
        "client .npy": lambda: client.search("audio", queries, top_k=TOP_K, target="audio"),
    }
    out = {}
    for name, call in calls.items():
        assert len(call()) == rows
        latencies, seconds = time_sync(lambda q: call(), queries, duration)
        out[name] = latency_summary(latencies, 0, seconds)
        print(f"batch of {rows}: {name}", json.dumps(out[name]), flush=True)
    return out


def bulk_items(n: int, seed: int) -> tuple[list[str], np.ndarray, list[dict]]:
    rng = np.random.default_rng(seed)
    return [f"c{seed}-{i}" for i in range(n)], rng.standard_normal((n, AUDIO_DIM)).round(4).astype(np.float32), [{"bench": 1}] * n


def bench_bulk(url: str, port: int, n: int) -> dict:
    out = {}
    ids = [f"w-{i}" for i in range(n)]
    requests = [upsert_request(ids[i : i + BATCH], np.random.default_rng(i)) for i in range(0, n, BATCH)]  # pre-encoded, as write_bench does
    result = asyncio.run(run_requests(port, requests, 4, 1e9))
    assert result["errors"] == 0, result
    out["write_bench (raw sockets, pre-encoded, 4 clients)"] = round(n / result["seconds"], 1)
    for fast in (True, False):
        saved = wire.orjson
        wire.orjson = saved if fast else None  # the json module: the client without the `fast` extra
        try:
            ids, vectors, metadata = bulk_items(n, 2 if fast else 3)
            with Client(url) as client:
                client.info()
                started = time.perf_counter()
                done = client.upsert("audio", ids, vectors, metadata, batch_size=BATCH)
                seconds = time.perf_counter() - started
            assert done.upserted == n
            out[f"Client.upsert, 1 caller{'' if fast else ', json (no orjson)'}"] = round(n / seconds, 1)
        finally:
            wire.orjson = saved
    ids, vectors, metadata = bulk_items(n, 5)
    with Client(url) as client:
        client.info()
        started = time.perf_counter()
        assert client.upsert("audio", ids, vectors, metadata, batch_size=BATCH, concurrency=4).upserted == n
        out["Client.upsert, concurrency=4"] = round(n / (time.perf_counter() - started), 1)
    ids, vectors, metadata = bulk_items(n, 4)

    async def four() -> float:
        async with AsyncClient(url) as client:
            await client.info()
            quarter = n // 4
            started = time.perf_counter()
            await asyncio.gather(*(client.upsert("audio", ids[k * quarter : (k + 1) * quarter], vectors[k * quarter : (k + 1) * quarter], metadata[k * quarter : (k + 1) * quarter], batch_size=BATCH) for k in range(4)))
            return time.perf_counter() - started

    out["AsyncClient.upsert, 4 callers"] = round(n / asyncio.run(four()), 1)
    print(json.dumps(out), flush=True)
    return out


def write_results(out: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "client_bench.json").write_text(json.dumps(out, indent=2))
    s = out["search"]
    lines = [
        "# Client benchmark (`bench/client_bench.py`)",
        "",
        f"{out['machine']}; model: tiny preset (embedding width 8); {out['items']:,}-item Flat audio index; one 128-feature audio query, top {TOP_K}, per request; "
        f"{out['duration']} s per variant and caller count, in {out['rounds']} turns taken in rotation; callers in the benchmark's process (they share the cores with the server); load average {out['load_average_1min']}.",
        "",
        "| search | 1 caller p50 / p99 ms | 1 caller searches/s | 16 callers p50 / p99 ms | 16 callers searches/s |",
        "|---|---|---|---|---|",
    ]
    for name, r in s.items():
        lines.append(f"| {name} | {r['1']['p50_ms']} / {r['1']['p99_ms']} | {r['1']['per_s']} | {r['16']['p50_ms']} / {r['16']['p99_ms']} | {r['16']['per_s']} |")
    ratio = lambda a, b, c, key: round(s[a][c][key] / s[b][c][key], 2)  # noqa: E731
    o = out["overhead_us"]
    lines += [
        "",
        f"Client ÷ hand-made httpx (same run; p50: above 1 = the client slower; searches/s: above 1 = the client faster): "
        f"1 caller p50 JSON {ratio('client JSON', 'httpx JSON (hand-made)', '1', 'p50_ms')}, .npy {ratio('client .npy', 'httpx .npy (hand-made)', '1', 'p50_ms')}; "
        f"16 callers searches/s JSON {ratio('client JSON', 'httpx JSON (hand-made)', '16', 'per_s')}, .npy {ratio('client .npy', 'httpx .npy (hand-made)', '16', 'per_s')}.",
        "",
        "What the client itself costs, free of the server and of the machine's noise: microseconds per call in one process over an in-memory transport "
        f"(httpx.MockTransport answering a canned top-{TOP_K}; best of 3 x 2000 calls): "
        + ", ".join(f"{name} {us} µs" for name, us in o.items())
        + f"; the client adds {round(o['client JSON'] - o['httpx JSON (hand-made)'], 1)} µs (JSON) and {round(o['client .npy'] - o['httpx .npy (hand-made)'], 1)} µs (.npy) to a hand-made call.",
        "",
        f"A batch of {out['batch_rows']} queries in one call (one request), 1 caller:",
        "",
        "| search | p50 / p99 ms | queries/s |",
        "|---|---|---|",
        *[f"| {name} | {r['p50_ms']} / {r['p99_ms']} | {round(r['per_s'] * out['batch_rows'], 1)} |" for name, r in out["batch"].items()],
        "",
        f"The .npy path's gain on the batch, p50 of JSON ÷ p50 of .npy: the client's JSON {round(out['batch']['client JSON']['p50_ms'] / out['batch']['client .npy']['p50_ms'], 2)}x, "
        f"a hand-made httpx JSON call {round(out['batch']['httpx JSON (hand-made)']['p50_ms'] / out['batch']['client .npy']['p50_ms'], 2)}x.",
        "",
        f"Bulk upsert: {out['bulk_items']:,} new audio items in batches of {BATCH} into the same index (items/s):",
        "",
        "| how | items/s |",
        "|---|---|",
    ]
    lines += [f"| {name} | {rate} |" for name, rate in out["bulk"].items()]
    base = out["bulk"]["write_bench (raw sockets, pre-encoded, 4 clients)"]
    lines += ["", "Over the server's own write benchmark (same run): " + ", ".join(f"{name} {round(rate / base, 2)}x" for name, rate in out["bulk"].items() if not name.startswith("write_bench")) + "."]
    lines += ["", *out["notes"]]
    (RESULTS / "client_bench.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e5, help="items in the served audio index")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per search variant and caller count (over all rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each search variant takes (its duration split between them)")
    parser.add_argument("--batch", type=int, default=256, help="queries in the one-call batch search")
    parser.add_argument("--bulk", type=float, default=1e5, help="items per bulk upload (0: skip)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"), help="cache shared with bench/write_bench.py")
    parser.add_argument("--note", action="append", default=[], help="a line added under the tables")
    args = parser.parse_args()
    model = tiny_model(args.work)
    index, _ = build_index(model, args.work, int(args.items), "Flat")
    proc, port = serve(model, index, snapshot_seconds=300)
    url = f"http://127.0.0.1:{port}"
    try:
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}", "items": int(args.items), "duration": args.duration, "rounds": args.rounds, "notes": args.note}
        out["overhead_us"] = bench_overhead()
        out["search"] = bench_search(url, args.duration, args.rounds)
        out["batch_rows"] = args.batch
        out["batch"] = bench_batch(url, args.duration, args.batch)
        out["bulk_items"] = int(args.bulk)
        out["bulk"] = bench_bulk(url, port, int(args.bulk)) if args.bulk else {}
        out["load_average_1min"] = round(os.getloadavg()[0], 2)
    finally:
        stop(proc)
    write_results(out)
    print(f"results: {RESULTS / 'client_bench.md'}")


if __name__ == "__main__":
    main()
