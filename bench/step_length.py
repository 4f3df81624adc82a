"""How the length of a background follower's step weighs on a lone client's round trip: a model.

    python bench/step_length.py                     # Flat- and HNSW32-like step costs, 3 rounds (~5 min)

With 2 workers, each change one client writes is applied by the two other processes in the
background (store.sharedlog.Follower): a scout at SCHED_IDLE asks, while a core idles, an applier at
nice 10 for one step after another. On 2 cores a request's thread that wakes may find that applier on
the core it wants. This bench models just that, without the service: a client process sends a byte
and waits for the answer; a server process passes each request from its receiving thread to another
that spins 0.5 ms and fdatasyncs 200 bytes (a group commit), then answers (about 0.9 ms of CPU a
request); two follower processes as above each apply every answered request, in steps of
``--steps`` records that spin ``fixed + records x per-record`` microseconds. Per preset, the settings
are taken in turn each round (the order reversed every other round), each for ``--seconds``; the
figures are medians over the rounds, the ratio against no followers at all. The presets' costs are
bench/follow_step.py's at 10^6 items: Flat ~100 us a step + 30 a record, HNSW32 upserts ~220 + 150.
Writes bench/results/step_length.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import queue
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402

RESULTS = REPO / "bench" / "results"
PRESETS = {"Flat": (100, 30), "HNSW32": (220, 150)}  # (us a step, us a record)
COUNTER = struct.Struct("<q")


def spin(microseconds: float) -> None:
    end = time.perf_counter() + microseconds / 1e6
    while time.perf_counter() < end:
        pass


def serve(listener: socket.socket, answered: mmap.mmap, log_path: str) -> None:
    requests: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def commit_thread() -> None:
        while True:
            requests.get()
            spin(500)
            os.write(fd, b"x" * 200)
            os.fdatasync(fd)
            COUNTER.pack_into(answered, 0, COUNTER.unpack_from(answered)[0] + 1)
            done.put(True)

    threading.Thread(target=commit_thread, daemon=True).start()
    connection, _ = listener.accept()
    while connection.recv(64):
        spin(200)
        requests.put(True)
        done.get()
        spin(100)
        connection.sendall(b"k")


def follow(answered: mmap.mmap, step: int, fixed_us: float, per_record_us: float, interval: float = 0.5) -> None:
    """store.sharedlog.Follower's threads, with spinning for applying."""
    asks: queue.SimpleQueue = queue.SimpleQueue()
    answers: queue.SimpleQueue = queue.SimpleQueue()
    applied = 0

    def applier() -> None:
        nonlocal applied
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        while True:
            asks.get()
            records = min(step, COUNTER.unpack_from(answered)[0] - applied)
            if records:
                spin(fixed_us + records * per_record_us)
            applied += records
            answers.put(records)

    threading.Thread(target=applier, daemon=True).start()
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    while True:
        time.sleep(interval)
        while True:
            asks.put(True)
            if not answers.get():
                break


def run(step: int | None, fixed_us: float, per_record_us: float, seconds: float) -> dict:
    """One setting: a lone client's round trips for ``seconds`` (step None: no followers)."""
    answered = mmap.mmap(-1, COUNTER.size)
    listener = socket.create_server(("127.0.0.1", 0))
    children = []
    with tempfile.TemporaryDirectory() as work:
        targets = [lambda: serve(listener, answered, os.path.join(work, "log"))]
        if step is not None:
            targets += [lambda: follow(answered, step, fixed_us, per_record_us)] * 2
        for target in targets:
            pid = os.fork()
            if pid == 0:
                try:
                    target()
                finally:
                    os._exit(0)
            children.append(pid)
        try:
            client = socket.create_connection(listener.getsockname())
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                client.sendall(b"w")
                spin(100)
                client.recv(64)
                times.append(time.perf_counter() - started)
            client.close()
        finally:
            for pid in children:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            listener.close()
    times.sort()
    pick = lambda q: 1000 * times[int(q * (len(times) - 1))]  # noqa: E731
    return {"requests": len(times), "p50_ms": pick(0.5), "p99_ms": pick(0.99), "p999_ms": pick(0.999)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="records a step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        fixed_us, per_record_us = PRESETS[preset]
        settings: list[int | None] = [None, *args.steps]
        runs: dict[int | None, list[dict]] = {s: [] for s in settings}
        for round_ in range(args.rounds):
            for step in settings if round_ % 2 == 0 else settings[::-1]:
                runs[step].append(run(step, fixed_us, per_record_us, args.seconds))
                print(f"{preset} round {round_ + 1}/{args.rounds}, {'no followers' if step is None else f'{step} records a step'}: p99 {runs[step][-1]['p99_ms']:.2f} ms", flush=True)
        alone = statistics.median(r["p99_ms"] for r in runs[None])
        for step, results in runs.items():
            p99 = statistics.median(r["p99_ms"] for r in results)
            rows.append({
                "preset": preset, "records_a_step": step, "step_us": None if step is None else fixed_us + step * per_record_us,
                "cpu_us_a_change": None if step is None else round(fixed_us / step + per_record_us, 1),
                "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 3), "p99_ms": round(p99, 3),
                "p999_ms": round(statistics.median(r["p999_ms"] for r in results), 3), "p99_ratio": round(p99 / alone, 2),
                "p99_rounds_ms": [round(r["p99_ms"], 3) for r in results],
            })
    out = {"command": "python " + " ".join(["bench/step_length.py", *sys.argv[1:]]), "commit": commit(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, Linux {platform.release()}", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_length.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# A background follower's step length against a lone client's round trip: a model (`{out['command']}`)", "",
        f"{out['machine']}, commit {out['commit']}; no service: the model in the bench's docstring; medians of {args.rounds} rounds of {args.seconds:g} s; ratio: p99 against no followers.", "",
        "| preset | records a step | step CPU us | follower CPU us a change | p50 ms | p99 ms | p99.9 ms | p99 / none | p99 each round |", "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        none = r["records_a_step"] is None
        lines.append(f"| {r['preset']} | {'no followers' if none else r['records_a_step']} | {'' if none else r['step_us']} | {'' if none else r['cpu_us_a_change']} | {r['p50_ms']} | {r['p99_ms']} | {r['p999_ms']} | {r['p99_ratio']} | {', '.join(map(str, r['p99_rounds_ms']))} |")
    (RESULTS / "step_length.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
