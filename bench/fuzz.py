"""Fuzzing run over every route of a real server, with and without keys: no answer of 500 or more.

    python bench/fuzz.py                      # 10^4 generated requests (about 5 minutes after the setup)
    python bench/fuzz.py --requests 2000
    python bench/fuzz.py --workers 2          # AVSEARCH_WORKERS=2: version swaps replace worker processes

Setup (cached in --work): the tiny preset trained on its synthetic set, exported and indexed. Then
two servers (``python -m service serve`` on 127.0.0.1, the deadlines and Host checks of production
included): one without keys (anonymous writes open to this machine), one with a read-write and a
read-only key. schemathesis generates requests from each server's own OpenAPI schema, which states
the loaded model's vector widths, so bodies reach search, embed and upsert rather than bouncing off
validation: every operation (console and admin included) in rounds, with no key, the read-write
key, the read-only key and a wrong key, until ``--requests`` were sent. Each answer's status is
counted; any of 500 or more is listed. Afterwards each server must answer /healthz, /readyz and a
valid search, and its log must hold no traceback. Writes bench/results/fuzz.md and fuzz.json
(fuzz_workers2.md and .json with ``--workers 2``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
KEYS = {"AVSEARCH_API_KEY": "fuzz-rw", "AVSEARCH_READ_API_KEY": "fuzz-ro"}
HEADERS = {"no key": None, "read-write key": "Bearer fuzz-rw", "read-only key": "Bearer fuzz-ro", "wrong key": "Bearer nope"}


def tiny_model(work: Path) -> tuple[Path, Path]:
    """(model dir, index dir) of the tiny preset, built on first use."""
    model, index = work / "model", work / "index"
    if (index / "visual").is_dir():
        return model, index
    from avdata.features import load_features, save_directory
    from avdata.synthetic import generate
    from index.build import build_indexes
    from training.config import load_config
    from training.export import export_run
    from training.train import CHECKPOINT_NAME, save_checkpoint, train

    cfg = load_config("tiny")
    data_dir = save_directory(generate(cfg.synthetic), work / "data")
    data = load_features(data_dir)
    save_checkpoint(work / "run" / CHECKPOINT_NAME, cfg, data, train(cfg, data, show_progress=False))
    export_run(work / "run", model)
    build_indexes(model, data_dir, index, progress=False)
    return model, index


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, index: Path, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "service", "serve", "--model", str(model), "--index", str(index), "--port", str(port)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AVSEARCH_MAX_VECTORS": "16", **env}
    process = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not ready(url):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"error: the server did not start; see {log}")
        time.sleep(0.3)
    return process, url


def ready(url: str) -> bool:
    import requests

    try:
        return requests.get(url + "/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def healthy(url: str, header: str | None) -> dict[str, int]:
    """Status of /healthz, /readyz and one valid search (with ``header``)."""
    import requests

    variants = requests.get(url + "/openapi.json", timeout=10).json()["components"]["schemas"]["SearchRequest"]["anyOf"]
    audio = next(v for v in variants if v["properties"]["modality"]["enum"] == ["audio"] and "vectors" in v["properties"])
    width = audio["properties"]["vectors"]["items"]["maxItems"]
    headers = {"Authorization": header} if header else {}
    search = requests.post(url + "/v1/search", json={"modality": "audio", "vectors": [[0.1] * width], "top_k": 3}, headers=headers, timeout=10)
    return {"healthz": requests.get(url + "/healthz", timeout=5).status_code, "readyz": requests.get(url + "/readyz", timeout=5).status_code, "search": search.status_code}


def fuzz(url: str, header: str | None, examples: int, statuses: collections.Counter, by_operation: dict, errors: list[dict]) -> int:
    """One round over every operation; returns the number of requests sent."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case) -> None:
            nonlocal sent
            response = case.call(headers={"Authorization": header} if header else None, timeout=60)
            sent += 1
            statuses[response.status_code] += 1
            by_operation[f"{operation.method.upper()} {operation.path}"][response.status_code // 100] += 1
            if response.status_code >= 500:
                errors.append({"method": case.method, "path": case.formatted_path, "status": response.status_code, "answer": response.text[:300]})

        run()
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000, help="generated requests to send in all")
    parser.add_argument("--examples", type=int, default=60, help="most examples per operation and key in one round")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("AVSEARCH_WORKERS", "1")), help="AVSEARCH_WORKERS of both servers")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-fuzz"), help="cache of the tiny model and index")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, index = tiny_model(args.work)
    import shutil

    servers = {}
    for name, env in (("no keys", {}), ("keys", KEYS)):
        copy = args.work / f"serve-{name.replace(' ', '-')}" / "index"
        shutil.rmtree(copy.parent, ignore_errors=True)
        shutil.copytree(index, copy)
        env = {**env, "AVSEARCH_WORKERS": str(args.workers)}
        servers[name] = (*start_server(model, copy, copy.parent / "server.log", env), copy.parent / "server.log")
    variants = [("no keys", "no key"), *(("keys", h) for h in HEADERS)]
    per_variant = {variant: collections.Counter() for variant in variants}
    by_operation: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # status class (2, 4, 5) counts
    errors: list[dict] = []
    sent, rounds, start = 0, 0, time.perf_counter()
    try:
        while sent < args.requests:
            rounds += 1
            for server, header_name in variants:
                if sent >= args.requests:
                    break
                sent += fuzz(servers[server][1], HEADERS[header_name], args.examples, per_variant[(server, header_name)], by_operation, errors)
                print(f"round {rounds}: {sent} requests, {len(errors)} answers >= 500", flush=True)
        seconds = time.perf_counter() - start
        after = {name: healthy(url, HEADERS["read-write key"] if name == "keys" else None) for name, (_, url, _) in servers.items()}
        alive = {name: process.poll() is None for name, (process, _, _) in servers.items()}
    finally:
        for process, _, _ in servers.values():
            process.terminate()
        for process, _, _ in servers.values():
            process.wait(60)
    tracebacks = {name: log.read_text().count("Traceback") for name, (_, _, log) in servers.items()}
    write_results(args.workers, sent, seconds, rounds, per_variant, by_operation, errors, after, alive, tracebacks)
    ok = not errors and all(alive.values()) and all(v == 200 for checks in after.values() for v in checks.values())
    return 0 if ok else 1


def write_results(workers, sent, seconds, rounds, per_variant, by_operation, errors, after, alive, tracebacks) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "fuzz" if workers == 1 else f"fuzz_workers{workers}"
    card = {
        "workers": workers,
        "requests": sent,
        "seconds": round(seconds, 1),
        "rounds": rounds,
        "answers_500_or_more": len(errors),
        "statuses": {f"{server}, {header}": dict(sorted(counts.items())) for (server, header), counts in per_variant.items()},
        "by_operation": {name: {f"{k}xx": n for k, n in sorted(counts.items())} for name, counts in sorted(by_operation.items())},
        "errors": errors[:50],
        "after": after,
        "servers_alive": alive,
        "tracebacks_in_server_logs": tracebacks,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = [
        "# Fuzzing run (bench/fuzz.py)",
        "",
        f"{sent} generated requests in {seconds:.0f} s ({rounds} rounds over every operation of the OpenAPI schema), "
        f"two real servers (no keys; read-write + read-only keys), {workers} worker process(es) each (AVSEARCH_WORKERS): **{len(errors)} answers >= 500**.",
        f"Afterwards: {after}; servers alive: {alive}; tracebacks in the server logs: {tracebacks}.",
        "",
        "| server, key sent | requests | answers by status |",
        "|---|---:|---|",
    ]
    for (server, header), counts in per_variant.items():
        lines.append(f"| {server}, {header} | {sum(counts.values())} | {', '.join(f'{code}: {n}' for code, n in sorted(counts.items()))} |")
    lines += ["", "Per operation (all servers and keys): a 2xx means the generated request got through validation to the work.", "",
              "| operation | requests | 2xx | 4xx | >= 500 |", "|---|---:|---:|---:|---:|"]
    for name, counts in sorted(by_operation.items()):
        lines.append(f"| `{name}` | {sum(counts.values())} | {counts[2]} | {counts[4]} | {counts[5]} |")
    if errors:
        lines += ["", "Answers >= 500:", ""] + [f"- {e['method']} {e['path']} -> {e['status']}: {e['answer']}" for e in errors[:50]]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
