"""Did the HTTP edge's checks (Host, Origin, routed-path keys, body bounds, connection deadlines) slow the search path?

    python bench/edge_latency.py --baseline /work/main    # this checkout against another, interleaved

One client, one keep-alive connection, sequential JSON searches of one audio vector (top 10) against
a real server (``python -m service serve``, the tiny model of bench/fuzz.py): 200 warm-up requests,
then ``--requests`` timed, per server, in ``--rounds`` interleaved rounds (the machine is shared:
compare within a run). Writes bench/results/edge_latency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.fuzz import free_port, ready, tiny_model  # noqa: E402

RESULTS = REPO / "bench" / "results"


def latencies(checkout: Path, model: Path, index: Path, body: str, n: int) -> tuple[float, float]:
    import requests

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout), "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, "-m", "service", "serve", "--model", str(model), "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(args, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/search"
    try:
        while not ready(url.removesuffix("/v1/search")):
            time.sleep(0.3)
        session, headers, times = requests.Session(), {"content-type": "application/json"}, []
        for i in range(200 + n):
            start = time.perf_counter()
            assert session.post(url, data=body, headers=headers).status_code == 200
            if i >= 200:
                times.append(time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(60)
    return float(np.median(times) * 1000), float(np.percentile(times, 99) * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout (e.g. /work/main, before the HTTP edge changes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-fuzz"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, index = tiny_model(args.work)
    body = json.dumps({"modality": "audio", "vectors": [np.random.default_rng(0).standard_normal(128).tolist()], "top_k": 10})
    rows = []
    for round_ in range(args.rounds):
        for name, checkout in (("baseline", args.baseline.resolve()), ("this checkout", REPO)):
            p50, p99 = latencies(checkout, model, index, body, args.requests)
            rows.append((round_ + 1, name, p50, p99))
            print(f"round {round_ + 1} {name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    median = {name: float(np.median([r[2] for r in rows if r[1] == name])) for name in ("baseline", "this checkout")}
    lines = [
        "# Search latency through the HTTP edge (bench/edge_latency.py)",
        "",
        f"{args.requests} sequential one-vector JSON searches per server and round, one keep-alive connection, {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| round | server | p50 (ms) | p99 (ms) |",
        "|---:|---|---:|---:|",
        *(f"| {r} | {name} | {p50:.2f} | {p99:.2f} |" for r, name, p50, p99 in rows),
        "",
        f"Median p50 over the rounds: baseline {median['baseline']:.2f} ms, this checkout {median['this checkout']:.2f} ms ({median['this checkout'] / median['baseline']:.2f}x).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
