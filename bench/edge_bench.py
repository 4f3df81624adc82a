"""Does a large JSON body stall other requests? /healthz latency while a big search body is parsed.

    python bench/edge_bench.py                          # this checkout
    python bench/edge_bench.py --baseline /work/main    # and another checkout (before the fix), same run

For each checkout: a real server (``python -m service serve``, the tiny model of bench/fuzz.py),
one client sending a JSON search of ``--vectors`` visual vectors (full-precision floats: ~20 MB at
1024 x 1024) while another asks /healthz every 10 ms on its own connection. Reported: the big
request's time, and /healthz latency (p50 and max) while it ran against p50 when idle. Writes
bench/results/edge_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.fuzz import free_port, ready, tiny_model  # noqa: E402

RESULTS = REPO / "bench" / "results"


def measure(checkout: Path, model: Path, index: Path, body: bytes) -> dict:
    import requests

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    args = [sys.executable, "-m", "service", "serve", "--model", str(model), "--index", str(index), "--port", str(port)]
    server = subprocess.Popen(args, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while not ready(url):
            time.sleep(0.3)
        probe = requests.Session()

        def healthz_ms() -> float:
            start = time.perf_counter()
            probe.get(url + "/healthz", timeout=60)
            return (time.perf_counter() - start) * 1000

        idle = [healthz_ms() for _ in range(50)]
        done, answer = threading.Event(), {}

        def big() -> None:
            start = time.perf_counter()
            r = requests.post(url + "/v1/search", data=body, headers={"content-type": "application/json"}, timeout=300)
            answer.update(status=r.status_code, seconds=time.perf_counter() - start)
            done.set()

        sender = threading.Thread(target=big)
        sender.start()
        during = []
        while not done.is_set():
            during.append(healthz_ms())
            time.sleep(0.01)
        sender.join()
    finally:
        server.terminate()
        server.wait(60)
    return {"big_status": answer["status"], "big_seconds": round(answer["seconds"], 2), "idle_p50_ms": round(float(np.median(idle)), 2),
            "during_p50_ms": round(float(np.median(during)), 2), "during_max_ms": round(max(during), 1), "probes": len(during)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="another checkout to measure in the same run (e.g. /work/main before the fix)")
    parser.add_argument("--vectors", type=int, default=1024)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-fuzz"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, index = tiny_model(args.work)
    width = json.loads((model / "manifest.json").read_text())["input_dims"]["visual"]
    vectors = np.random.default_rng(0).standard_normal((args.vectors, width)).tolist()
    body = json.dumps({"modality": "visual", "vectors": vectors, "top_k": 1}).encode()
    rows = {}
    for name, checkout in (("baseline", args.baseline), ("this checkout", REPO)):
        if checkout is not None:
            rows[name] = measure(checkout.resolve(), model, index, body)
            print(name, rows[name], flush=True)
    lines = [
        "# A large JSON body and the event loop (bench/edge_bench.py)",
        "",
        f"One search of {args.vectors} visual vectors of {width} floats ({len(body) / 1e6:.1f} MB of JSON) while /healthz is asked every 10 ms.",
        "",
        "| server | big request | its time (s) | /healthz p50 idle (ms) | p50 during (ms) | max during (ms) | probes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['big_status']} | {r['big_seconds']} | {r['idle_p50_ms']} | {r['during_p50_ms']} | {r['during_max_ms']} | {r['probes']} |")
    if len(rows) == 2:
        a, b = rows["baseline"]["during_max_ms"], rows["this checkout"]["during_max_ms"]
        lines += ["", f"Max /healthz latency during the big body: {a} ms before, {b} ms now ({a / b:.0f}x lower)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "edge_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
