"""Writes with 1 and 2 worker processes, measured side by side: both servers up at once, short
trials alternating between them, so that the machine's drift (this VM's disk and CPU vary by 2x
within minutes) falls on both alike.

    python bench/write_workers_ab.py                         # 10^6 items, Flat and HNSW32, 6 trials (~15 min)
    python bench/write_workers_ab.py --items 1e5 --trials 2  # a quick look
    python bench/write_workers_ab.py --factories HNSW32 --follow-seconds 1000 --name write_workers_ab_nofollow  # no background catch-up
    python bench/write_workers_ab.py --no-folds --factories Flat --name write_workers_ab_nofolds_stock  # what the folds cost: none during the trials
    python bench/write_workers_ab.py --no-folds --factories Flat --follow-seconds 1000 --trials 4 --name write_workers_ab_nofolds_nofollow_stock  # nor background catch-up
    python bench/write_workers_ab.py --even-connections --name write_workers_ab_even  # what the kernel's uneven split of connections costs
    python bench/write_workers_ab.py --trials 4 --settle 5 --name write_workers_ab_settled  # one client's deletes once the 16-client backlog is applied
    python bench/write_workers_ab.py --pool write_workers_ab write_workers_ab_run2 write_workers_ab_run3 --name write_workers_ab_stock_pooled3  # medians over the trials of several runs (no servers)
    python bench/write_workers_ab.py --second-workers 1 --name write_workers_ab_aa  # A/A: two 1-worker servers, the bench's own spread (and --name write_workers_ab_aa_run2)
    python bench/write_workers_ab.py --pool write_workers_ab_aa write_workers_ab_aa_run2 --name write_workers_ab_aa_pooled
    python bench/write_workers_ab.py --no-folds --factories Flat --phases upsert:1 --name write_workers_ab_nofolds_upsert1  # one phase alone: what the others leave behind

Per index type: two copies of an audio index of ``--items`` random unit embeddings (the tiny model's
width; bench/write_bench.py builds and caches it), served by ``python -m service serve`` with
``AVSEARCH_WORKERS=1`` and ``=2`` at the same time (folds every ``--snapshot-seconds``, as in
write_bench). Before the trials each server is given the same stock of items to delete
(``--delete-stock`` a trial, bulk-upserted 1,000 a request). Each trial runs write_bench's four
phases on one server, then on the other (the order flips every trial), each ``--phase-seconds``
long: single-item upserts by 1 and by 16 clients, then single-item deletes from the stock by 16
clients and by 1 client. Every phase runs for the same time on both servers. (Until 3bb00d2 the
deletes took two thirds and the last third of the items the trial had upserted, so the server that
upserted faster had more to delete: 2 workers' one-client Flat deletes ran 5.1-5.4 s against 1
worker's 3.8-3.9 s, a different workload under the same name.) After each server's turn the bench
waits until that server's audio checkpoint holds every change of the turn (its fold written: a
fixed pause was too short at 10^6 HNSW32, and one server's fold then ran during the other's turn),
then ``--pause`` seconds. Each figure is the median over the trials; the ratio is 2 workers over 1;
target within 20 % (throughput at least 0.8x, p99 at most 1.2x), no errors. Beside each ratio:
its 95 % bootstrap interval (each server's trials resampled), and the one-sided Mann-Whitney p over
the trials that the second server's figure is the worse (how often two servers alike would differ
as much by chance). ``--second-workers 1`` runs an A/A: two identical 1-worker servers, whose
ratios show what this VM's noise alone does to the figures. While one server is timed, the other
is idle. Each server serves its own copy of the index. Results:
``bench/results/<--name>.{json,md}`` (write_workers_ab by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.http_bench import commit  # noqa: E402
from bench.server_tree import stop_tree  # noqa: E402
from bench.write_bench import build_index, delete_request, run_requests, serve, tiny_model, upsert_request  # noqa: E402
from store.layout import checkpoint_lsn  # noqa: E402

RESULTS = REPO / "bench" / "results"
PHASES_ARG = "upsert:1,upsert:16,delete:16,delete:1"
COUNTS = (1, 2)


def parse_phases(text: str) -> tuple[tuple[str, int], ...]:
    """``upsert:1,delete:16`` -> (("upsert", 1), ("delete", 16))."""
    phases = []
    for phase in text.split(","):
        op, _, clients = phase.partition(":")
        if op not in ("upsert", "delete") or not clients.isdigit() or int(clients) < 1:
            raise argparse.ArgumentTypeError(f"{phase!r}: a phase is upsert:N or delete:N (N clients, at least 1)")
        phases.append((op, int(clients)))
    return tuple(phases)


PHASES = parse_phases(PHASES_ARG)  # a server's turn: write_bench's four phases
NO_FOLD_ENV = {"AVSEARCH_WAL_SNAPSHOT_SECONDS": str(10**9), "AVSEARCH_WAL_SNAPSHOT_BYTES": str(10**15), "AVSEARCH_WAL_SNAPSHOT_GROWTH": "0"}  # --no-folds: no checkpoint falls due during a run, neither by age nor by size
STOCK_BULK = 1000  # items a request when making the stock (AVSEARCH_MAX_VECTORS in write_bench.serve)


def trial(port: int, tag: str, seconds: float, stock: "Stock", processes: int = 1, settle: float = 0.0, phases: tuple = PHASES) -> dict:
    """write_bench's four phases on one server: {"upsert_1": summary, ...}; the deletes take items
    from ``stock``; ``settle`` seconds of nothing before the one-client deletes (the 16-client
    deletes' backlog applied meanwhile)."""
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    ids = [f"{tag}-{i}" for i in range(int(4000 * seconds))]  # more than two phases of upserts take here
    upserts = [upsert_request([i], rng) for i in ids]
    out, written = {}, 0
    for op, clients in phases:
        if op == "upsert":
            result = asyncio.run(run_requests(port, upserts[written:], clients, seconds, processes))
            written += result["requests"]
        else:
            if clients == 1:
                time.sleep(settle)
            result = asyncio.run(run_requests(port, stock.requests(), clients, seconds, processes))
            stock.taken(result["requests"], seconds, result["seconds"])
        out[f"{op}_{clients}"] = result
    return out


class Stock:
    """Items made on a server before the trials for its delete phases to take, in order: both
    servers delete for a phase's whole length, whatever each upserted (a delete answered 404 would
    count as an error)."""

    def __init__(self, port: int, count: int):
        rng = np.random.default_rng(0)  # the same items on both servers
        self.ids = [f"stock-{i}" for i in range(count)]
        bulk = [upsert_request(self.ids[i : i + STOCK_BULK], rng) for i in range(0, count, STOCK_BULK)]
        result = asyncio.run(run_requests(port, bulk, 4, float("inf")))
        if result["errors"]:
            raise SystemExit(f"error: making the stock of items to delete: {result['errors']} of {result['requests']} upserts failed")
        self.changes, self.next = len(bulk), 0  # one change per request

    def requests(self) -> list[bytes]:
        return [delete_request(i) for i in self.ids[self.next :]]

    def taken(self, count: int, seconds: float, elapsed: float) -> None:
        self.next += count
        if self.next >= len(self.ids) and elapsed < seconds:
            raise SystemExit(f"error: the stock of items to delete ran out {elapsed:.1f} s into a {seconds:g} s phase; raise --delete-stock")


def ratio_interval(first: list[float], second: list[float], draws: int = 4000) -> tuple[float, float]:
    """95 % bootstrap interval of median(second) / median(first), each server's trials resampled."""
    rng = np.random.default_rng(0)
    one = np.median(rng.choice(first, (draws, len(first))), axis=1)
    two = np.median(rng.choice(second, (draws, len(second))), axis=1)
    low, high = np.percentile(two / one, [2.5, 97.5])
    return float(low), float(high)


def compare(trials: dict[int, list[dict]], phases: tuple = PHASES) -> list[dict]:
    rows = []
    for op, clients in phases:
        key = f"{op}_{clients}"
        for figure, better_high in (("per_s", True), ("p99_ms", False)):
            first, second = ([t[key][figure] for t in trials[w]] for w in COUNTS)
            one, two = statistics.median(first), statistics.median(second)
            ratio = two / one if one else float("nan")
            worse = mannwhitneyu(second, first, alternative="less" if better_high else "greater").pvalue  # H1: the second server's figures are the worse
            low, high = ratio_interval(first, second)
            rows.append({"phase": key, "figure": figure, "1": round(one, 2), "2": round(two, 2), "ratio": round(ratio, 2), "ci95": [round(low, 2), round(high, 2)], "p_worse": round(float(worse), 3), "ok": ratio >= 0.8 if better_high else ratio <= 1.2})
    errors = {w: sum(t[k]["errors"] for t in trials[w] for k in t) for w in COUNTS}
    rows.append({"phase": "all", "figure": "errors", "1": errors[1], "2": errors[2], "ratio": None, "ok": errors[2] == 0})
    return rows


def folded(index: Path, changes: int, timeout: float = 120.0) -> float:
    """Wait until the audio checkpoint holds all ``changes`` made so far (its fold written, so no
    fold of this server runs while the other is timed); the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if checkpoint_lsn(index / "audio") >= changes:
                return time.monotonic() - started
        except ValueError:  # a card read while it is replaced
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{index}: the audio checkpoint does not hold change {changes} after {timeout:.0f} s")


def measure(model: Path, work: Path, n: int, factory: str, args) -> dict:
    servers, indexes, changes = {}, {}, dict.fromkeys(COUNTS, 0)
    processes = {1: 1, 2: args.second_workers}  # the two servers' worker processes
    env = {"AVSEARCH_FOLLOW_SECONDS": str(args.follow_seconds)} if args.follow_seconds else {}
    if args.no_folds:  # neither by age nor by size
        env |= NO_FOLD_ENV
    try:
        for workers in COUNTS:
            indexes[workers], _ = build_index(model, work, n, factory, copy=f"-{workers}-workers")  # a copy each: each server writes its log and checkpoints there
            servers[workers] = serve(model, indexes[workers], args.snapshot_seconds, processes[workers], env)
        stocks = {w: Stock(servers[w][1], args.delete_stock * args.trials) for w in COUNTS}
        for w in COUNTS:
            changes[w] = stocks[w].changes
            if not args.no_folds:
                folded(indexes[w], changes[w])
        trials: dict[int, list[dict]] = {w: [] for w in COUNTS}
        waited: dict[int, list[float]] = {w: [] for w in COUNTS}
        for t in range(args.trials):
            for workers in COUNTS if t % 2 == 0 else tuple(reversed(COUNTS)):
                trials[workers].append(trial(servers[workers][1], f"t{t}w{workers}", args.phase_seconds, stocks[workers], processes[workers] if args.even_connections else 1, args.settle, args.phases))
                changes[workers] += sum(r["requests"] - r["errors"] for r in trials[workers][-1].values())  # each answered write is one change
                waited[workers].append(0.0 if args.no_folds else round(folded(indexes[workers], changes[workers]), 1))
                time.sleep(args.pause)
            print(f"{factory} trial {t + 1}/{args.trials}: upserts/s 1 client {trials[1][-1]['upsert_1']['per_s']} vs {trials[2][-1]['upsert_1']['per_s']}", flush=True)
    finally:
        for proc, _ in servers.values():
            stop_tree(proc)
    return {"items": n, "factory": factory, "rows": compare(trials, args.phases), "trials": {str(w): trials[w] for w in COUNTS}, "fold_waits_s": {str(w): waited[w] for w in COUNTS}}


def pooled(names: list[str], name: str) -> dict:
    """One result whose trials are those of every run in ``names`` (runs of one command: one
    client's p99 moves 1.5-2x between trials on a small VM, so more trials give a steadier median)."""
    runs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    for run in runs:
        run.setdefault("second_workers", 2)  # runs from before --second-workers
        run.setdefault("phases", PHASES_ARG)  # runs from before --phases
    for key in ("phase_seconds", "pause", "snapshot_seconds", "follow_seconds", "no_folds", "settle", "deletes", "second_workers", "phases"):  # what the header states once for all of them
        if len({json.dumps(run.get(key)) for run in runs}) > 1:
            raise SystemExit(f"error: --pool: the runs differ in {key} ({', '.join(f'{n}: {run.get(key)}' for n, run in zip(names, runs))}); pool runs of one command only")
    points = []
    for point in runs[0]["points"]:
        same = [p for run in runs for p in run["points"] if (p["items"], p["factory"]) == (point["items"], point["factory"])]
        trials = {w: [t for p in same for t in p["trials"][str(w)]] for w in COUNTS}
        points.append({"items": point["items"], "factory": point["factory"], "rows": compare(trials, parse_phases(runs[0]["phases"])), "trials": {str(w): trials[w] for w in COUNTS}, "runs": len(same)})
    commits = ", ".join(run["commit"] for run in runs)
    return {**runs[0], "command": f"python bench/write_workers_ab.py --pool {' '.join(names)} --name {name}", "commit": f"{commits} (pooled: {' + '.join(run['command'] for run in runs)})",
            "trials": sum(run["trials"] for run in runs), "load_before": [run["load_before"] for run in runs], "load_after": [run["load_after"] for run in runs], "points": points}


def write_results(out: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    second = out.get("second_workers", 2)
    second_name = f"{second} worker{'s' if second > 1 else ''}" + (" (the second server)" if second == 1 else "")
    lines = [
        "# Writes with 1 and 2 worker processes, side by side (`bench/write_workers_ab.py`)" if second == 2 else f"# Writes with 1 worker and {second_name}, side by side (`bench/write_workers_ab.py`{', an A/A' if second == 1 else ''})",
        "",
        f"`{out['command']}` on {out['machine']}, commit {out['commit']}; both servers up at once, {out['trials']} trials "
        f"alternating between them (order flipped each trial), {'a turn of phases ' + out['phases'] if out.get('phases', PHASES_ARG) != PHASES_ARG else 'phases'} of {out['phase_seconds']} s; after each server's turn, {'' if out.get('no_folds') else 'its last fold written, then '}"
        f"{out['pause']} s; {'no folds' if out.get('no_folds') else 'folds every ' + str(out['snapshot_seconds']) + ' s'}, background catch-up every {out['follow_seconds'] or 'default'} s"
        f"{'; ' + str(out['settle']) + ' s without requests before the one-client deletes' if out.get('settle') else ''}; deletes {out.get('deletes') or 'of two thirds and the last third of the items the trial upserted'}. Each figure is the median over the trials (every trial in the JSON). "
        f"Load average before / after: {out['load_before']} / {out['load_after']}. Target: within 20% of one worker's "
        "(throughput at least 0.8x, p99 at most 1.2x), no errors. 95% interval: of the ratio, bootstrapping each server's trials; p: one-sided Mann-Whitney over the trials, that the second server's figure is the worse.",
    ]
    for point in out["points"]:
        lines += ["", f"## {point['items']:.0e} items, {point['factory']}", "", f"| phase | figure | 1 worker | {second_name} | ratio second / first | 95% interval | p | within 20% |", "|---|---|---:|---:|---:|---|---:|---|"]
        for row in point["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
            interval = "-".join(f"{x:.2f}" for x in row["ci95"]) if row.get("ci95") else ""
            lines.append(f"| {row['phase']} | {row['figure']} | {row['1']} | {row['2']} | {ratio} | {interval} | {row.get('p_worse', '')} | {'✓' if row['ok'] else '✗'} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=float, default=1e6)
    parser.add_argument("--factories", nargs="+", default=["Flat", "HNSW32"])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--phase-seconds", type=float, default=6.0, help="at least twice --snapshot-seconds: every phase then holds folds on both servers (with 2 s phases, which phase a fold fell in differed between them)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds after each server's turn, once its last fold is written")
    parser.add_argument("--snapshot-seconds", type=float, default=3.0)
    parser.add_argument("--no-folds", action="store_true", help="no checkpoint on either server during the run: what the folds add to the figures (the trials then do not wait for one)")
    parser.add_argument("--even-connections", action="store_true", help="each worker holds the same number of the clients' connections (chosen by reconnecting; the kernel's hash splits them unevenly, bench/connection_split.py): what the uneven split adds to the 16-client figures")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds of no requests between the 16-client and the one-client deletes: with 2 workers the other processes apply the 16-client phase's backlog then, rather than during the one-client phase")
    parser.add_argument("--follow-seconds", type=float, help="AVSEARCH_FOLLOW_SECONDS of both servers (how often each process of the 2-worker one applies the others' changes in the background; 1 worker has none); unset: the default")
    parser.add_argument("--delete-stock", type=int, default=25000, help="items made on each server before the trials for each trial's delete phases (at 10^6 Flat, 2 workers delete ~1,700/s by 16 clients and ~800/s by one: ~15,000 in two 6 s phases; ~18,500 at 10^5); a run whose stock runs out stops with an error")
    parser.add_argument("--second-workers", type=int, default=2, help="worker processes of the second server (the first has 1); 1: an A/A run, the bench's own spread")
    parser.add_argument("--work", type=Path, default=Path("/tmp/avsearch-write-bench"))
    parser.add_argument("--pool", nargs="+", metavar="NAME", help="run nothing: the figures over every trial of these earlier results (bench/results/NAME.json, same command), one table per index type")
    parser.add_argument("--phases", default=PHASES_ARG, type=parse_phases, help="the phases of a server's turn, in order: OP:CLIENTS, comma-separated (OP: upsert or delete)")
    parser.add_argument("--name", default="write_workers_ab", help="results file stem under bench/results")
    args = parser.parse_args()
    if args.pool:
        write_results(pooled(args.pool, args.name), args.name)
        print((RESULTS / f"{args.name}.md").read_text())
        return
    model = tiny_model(args.work)
    out = {
        "command": "python " + " ".join(["bench/write_workers_ab.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "commit": commit(),
        "trials": args.trials,
        "phase_seconds": args.phase_seconds,
        "pause": args.pause,
        "snapshot_seconds": args.snapshot_seconds,
        "follow_seconds": args.follow_seconds,
        "no_folds": args.no_folds,
        "settle": args.settle,
        "deletes": f"from a stock of {args.delete_stock} items a trial, for the whole phase",
        "second_workers": args.second_workers,
        "phases": ",".join(f"{op}:{clients}" for op, clients in args.phases),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    out["points"] = [measure(model, args.work, int(args.items), factory, args) for factory in args.factories]
    out["load_after"] = [round(x, 2) for x in os.getloadavg()]
    write_results(out, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
