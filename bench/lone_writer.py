"""Where a lone writer's slow answers come from, with 1 and 2 worker processes: during folds or between them.

    python bench/lone_writer.py                        # 10^6 Flat, 4 turns of 15 s a server (~6 min)
    python bench/lone_writer.py --factory HNSW32 --name lone_writer_hnsw
    python bench/lone_writer.py --no-folds --seconds 6 --rounds 12 --name lone_writer_nofolds   # the A/B's phase length, no folds
    python bench/lone_writer.py --no-folds --seconds 6 --rounds 12 --env AVSEARCH_FOLLOW_SECONDS=1000 --name lone_writer_nofollow

bench/write_workers_ab.py gives one p99 a phase. Here one client upserts single items through one
keep-alive connection, for ``--seconds`` a turn, into a 1-worker and a 2-worker server that are up
at once (turns alternate, the order flips each round), with folds every ``--snapshot-seconds``
as in write_bench. Every answer's send time and latency are kept, and each fold's span is read off
the server's log line for it ("snapshot at change ... in X s ... commits held Y ms, after Z ms to
pause them", timed as it appears): from asking to pause the commits to the fold's end. An answer
that overlaps a span counts as "during a fold". Then, per server: p50/p99 of all answers, of those
during folds and of the rest, and the share of answers slower than the 1-worker server's p99.
Beside them, each turn's own p99 (what bench/write_workers_ab.py takes a phase), their median a
server and the median of the turns' ratios (2 workers / 1, the two turns of a round paired): a p99
over every turn's answers is set by the worst turns, where the machine's drift dwarfs the servers'
difference, so pooled p99s can be level while the turns' p99s are not.
Results: ``bench/results/<--name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit, read_response  # noqa: E402
from bench.server_tree import stop_tree  # noqa: E402
from bench.write_bench import build_index, serve, tiny_model, upsert_request  # noqa: E402
from bench.write_workers_ab import NO_FOLD_ENV  # noqa: E402

RESULTS = REPO / "bench" / "results"
FOLD_LINE = re.compile(r"audio: snapshot at change \d+ \(\d+ items\) in ([\d.]+) s; log truncated \(commits held (\d+) ms, after (\d+) ms")
COUNTS = (1, 2)


def timed_lines(path: Path, lines: list[tuple[float, str]], stop: threading.Event) -> None:
    """Append (perf_counter when seen, line) for each line the server logs from now on."""
    with open(path) as log:
        log.seek(0, os.SEEK_END)
        while not stop.is_set():
            line = log.readline()
            if line:
                lines.append((time.perf_counter(), line.strip()))
            else:
                time.sleep(0.002)


def fold_spans(lines: list[tuple[float, str]]) -> list[tuple[float, float]]:
    """(start, end) of each audio fold: from asking to pause the commits to the log line at its end."""
    spans = []
    for seen, line in lines:
        if match := FOLD_LINE.search(line):
            writing, held, waited = float(match[1]), int(match[2]) / 1000, int(match[3]) / 1000
            spans.append((seen - writing - held - waited, seen))
    return spans


async def lone_client(port: int, requests: list[bytes], seconds: float) -> list[tuple[float, float, int]]:
    """(sent, seconds to the answer, status) of each request, one at a time, for ``seconds``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers, started = [], time.perf_counter()
    for request in requests:
        if time.perf_counter() - started >= seconds:
            break
        sent = time.perf_counter()
        writer.write(request)
        status, _ = await read_response(reader)
        answers.append((sent, time.perf_counter() - sent, status))
    writer.close()
    return answers


def split(answers: list[tuple[float, float, int]], spans: list[tuple[float, float]], slow: float) -> dict:
    sent = np.array([a[0] for a in answers])
    latency = np.array([a[1] for a in answers])
    during = np.zeros(len(sent), bool)
    for start, end in spans:
        during |= (sent + latency > start) & (sent < end)

    def figures(mask: np.ndarray) -> dict:
        ms = 1000 * latency[mask]
        return {"answers": int(mask.sum()), "p50_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2), "slow": round(float((latency[mask] > slow).mean()), 4)} if mask.any() else {"answers": 0}

    return {"folds": len(spans), "errors": sum(a[2] != 200 for a in answers), "all": figures(np.ones(len(sent), bool)), "during folds": figures(during), "between folds": figures(~during)}


def setting(text: str) -> str:
    """``--env``'s NAME=VALUE, checked."""
    if "=" not in text or not text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: a setting is NAME=VALUE")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--seconds", type=float, default=15.0, help="a turn")
    parser.add_argument("--rounds", type=int, default=4, help="turns a server")
    parser.add_argument("--snapshot-seconds", type=float, default=3.0)
    parser.add_argument("--no-folds", action="store_true", help="no checkpoint falls due during the run (neither by age nor by size)")
    parser.add_argument("--env", action="append", default=[], type=setting, metavar="NAME=VALUE", help="a setting for both servers, e.g. AVSEARCH_FOLLOW_SECONDS=1000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"))
    parser.add_argument("--name", default="lone_writer")
    args = parser.parse_args()
    model = tiny_model(args.work)
    env = dict(name_value.split("=", 1) for name_value in args.env)
    if args.no_folds:
        env |= NO_FOLD_ENV
    servers, lines, answers, stop = {}, {w: [] for w in COUNTS}, {w: [] for w in COUNTS}, threading.Event()
    turn_p99 = {w: [] for w in COUNTS}
    rng = np.random.default_rng(0)
    try:
        for workers in COUNTS:
            index, _ = build_index(model, args.work, int(args.items), args.factory, copy=f"-lone-{workers}")
            servers[workers] = serve(model, index, args.snapshot_seconds, workers, env)
            threading.Thread(target=timed_lines, args=(servers[workers][0].log_path, lines[workers], stop), daemon=True).start()
        for turn in range(args.rounds):
            for workers in COUNTS if turn % 2 == 0 else tuple(reversed(COUNTS)):
                requests = [upsert_request([f"lone-{turn}-{workers}-{i}"], rng) for i in range(int(3000 * args.seconds))]
                time.sleep(1 if args.no_folds else args.snapshot_seconds + 1)  # the last turn's fold done, on either server
                got = asyncio.run(lone_client(servers[workers][1], requests, args.seconds))
                answers[workers] += got
                turn_p99[workers].append(round(float(np.percentile([1000 * a[1] for a in got], 99)), 2))
                print(f"turn {turn + 1}/{args.rounds}, {workers} worker(s): {len(got)} answers, p99 {turn_p99[workers][-1]} ms", flush=True)
    finally:
        stop.set()
        for proc, _ in servers.values():
            stop_tree(proc)
    slow = float(np.percentile([a[1] for a in answers[1]], 99))
    out = {
        "command": "python " + " ".join(["bench/lone_writer.py", *sys.argv[1:]]), "commit": commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "items": int(args.items), "factory": args.factory, "seconds": args.seconds, "rounds": args.rounds,
        "snapshot_seconds": None if args.no_folds else args.snapshot_seconds, "env": env,
        "slow_ms": round(1000 * slow, 2), "servers": {str(w): split(answers[w], fold_spans(lines[w]), slow) for w in COUNTS},
        "turn_p99_ms": {str(w): turn_p99[w] for w in COUNTS},
        "median_turn_p99_ms": {str(w): round(float(np.median(turn_p99[w])), 2) for w in COUNTS},
        "median_turn_ratio": round(float(np.median(np.array(turn_p99[2]) / np.array(turn_p99[1]))), 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        f"# A lone writer's answers, during folds and between them (`{out['command']}`)", "",
        f"{out['machine']}, commit {out['commit']}; {out['items']:,} {args.factory} items; one client upserting single items, {args.rounds} turns of {args.seconds:g} s a server, "
        f"both servers up at once; {'no folds' if args.no_folds else f'folds every {args.snapshot_seconds:g} s'}"
        f"{''.join(f'; {name_value}' for name_value in args.env)}. \"Slow\": over the 1-worker server's p99 ({out['slow_ms']} ms).", "",
        "| workers | answers | folds | errors | when | share of answers | p50 ms | p99 ms | slow |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for workers, server in out["servers"].items():
        total = server["all"]["answers"]
        for when in ("all", "during folds", "between folds"):
            f = server[when]
            if f["answers"]:
                md.append(f"| {workers} | {total:,} | {server['folds']} | {server['errors']} | {when} | {f['answers'] / total:.1%} | {f['p50_ms']} | {f['p99_ms']} | {f['slow']:.2%} |")
    md += ["", "Each turn's p99 (ms), as bench/write_workers_ab.py takes it a phase:", "", "| workers | every turn | median |", "|---:|---|---:|"]
    md += [f"| {w} | {', '.join(map(str, out['turn_p99_ms'][str(w)]))} | {out['median_turn_p99_ms'][str(w)]} |" for w in COUNTS]
    md += ["", f"Median of the turns' ratios, 2 workers / 1 (a round's two turns paired): **{out['median_turn_ratio']}**."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
