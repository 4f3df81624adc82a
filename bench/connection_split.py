"""How the kernel splits keep-alive connections between worker processes (issue 22's 16-client p99s).

    python bench/connection_split.py                      # 2 workers, 16 connections, 20 tries (~20 s)
    python bench/connection_split.py --workers 4 --connections 64

Each worker accepts from its own ``SO_REUSEPORT`` socket on the port (service.workers), so the
kernel picks a worker per connection by a hash of its addresses, not by load. Per try, the bench
opens ``--connections`` connections to ``python -m service serve`` (a 1,000-item index), sends
one ``GET /readyz`` on each, and counts which process holds each established connection
(``ss -tnp``). A closed-loop client on an uneven split queues more on the busier worker: its
p99 spreads while the median falls. Writes bench/results/connection_split.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402
from bench.server_tree import stop_tree  # noqa: E402
from bench.trained import trained_default_model  # noqa: E402
from bench.write_bench import build_index, serve  # noqa: E402

RESULTS = REPO / "bench" / "results"


async def one_split(port: int, connections: int, workers: int) -> list[int]:
    """Connections per worker process, fewest first (a worker holding none counts 0)."""
    opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    try:
        for _, writer in opened:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
        for reader, _ in opened:
            await reader.readuntil(b"\r\n\r\n")  # accepted and answered: the connection is the worker's
        table = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
        held = collections.Counter(re.findall(r"pid=(\d+)", table))
    finally:
        for _, writer in opened:
            writer.close()
    return sorted(list(held.values()) + [0] * (workers - len(held)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tries", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-http-bench"), help="model and built indexes, shared with the other benches")
    args = parser.parse_args()
    model = trained_default_model(args.work)
    index, _ = build_index(model, args.work, 1000, "Flat")
    proc, port = serve(model, index, snapshot_seconds=300, workers=args.workers)
    try:
        splits = [asyncio.run(one_split(port, args.connections, args.workers)) for _ in range(args.tries)]
    finally:
        stop_tree(proc)
    counts = collections.Counter(tuple(s) for s in splits)
    fair = args.connections / args.workers
    out = {"command": "python " + " ".join(["bench/connection_split.py", *sys.argv[1:]]), "commit": commit(), "workers": args.workers,
           "connections": args.connections, "splits": splits, "busiest_over_fair": [round(max(s) / fair, 2) for s in splits]}
    lines = [f"# Connections per worker (`{out['command']}`, commit {out['commit']})", "",
             f"{args.tries} tries of {args.connections} keep-alive connections to {args.workers} workers (SO_REUSEPORT: the kernel's hash picks the worker).", "",
             "| split (connections per worker) | tries | busiest worker over an even share |", "|---|---:|---:|"]
    for split, n in sorted(counts.items(), key=lambda kv: max(kv[0])):
        lines.append(f"| {' / '.join(map(str, split))} | {n} | {max(split) / fair:.2f}x |")
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "connection_split.json").write_text(json.dumps(out, indent=2))
    (RESULTS / "connection_split.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
