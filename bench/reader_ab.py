"""A/B of the log reader and the exact search against an older commit, in one process.

Issue 21 made the write-ahead log's reader tell a torn tail from corruption (``service/wal.py``, now ``store/wal.py``)
and the exact search rank NaN scores last (``index/exact.py``); both sit on hot paths (start-up
replays the log; every Flat search runs the exact search). This loads each module as it is now and
as it was at ``--ref`` side by side, and times: recovering a log of ``--records`` visual records
(1024 raw features + an 8-float embedding each, as the tiny model writes), and top-10 exact search
over 10^6 random 16-d rows for 1 and 64 queries. Best of ``--repeats``, old and new interleaved.

    python bench/reader_ab.py [--ref d8f9aa3] [--records 20000]

Results: printed, and written to ``bench/results/reader_ab.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import best_time  # noqa: E402
from index import exact  # noqa: E402
from store import wal  # noqa: E402
from store.changes import Change  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reader_ab.md"


def module_at(ref: str, path: str, name: str):
    """The module ``path`` as committed at ``ref``, imported under ``name``."""
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    file = Path(tempfile.mkdtemp()) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="d8f9aa3", help="the older commit (default: before issue 21)")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    old_wal, old_exact = module_at(args.ref, "service/wal.py", "wal_old"), module_at(args.ref, "index/exact.py", "exact_old")
    rng = np.random.default_rng(0)
    rows = [f"| case | {args.ref} | now | now / {args.ref} |", "|---|---|---|---|"]

    def compare(case: str, old_fn, new_fn) -> None:
        old_s, new_s = float("inf"), float("inf")
        for _ in range(args.repeats):  # interleaved: a busy moment of the shared machine hits both
            old_s, new_s = min(old_s, best_time(old_fn, 1)), min(new_s, best_time(new_fn, 1))
        rows.append(f"| {case} | {old_s * 1e3:.1f} ms | {new_s * 1e3:.1f} ms | {new_s / old_s:.2f} |")
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as directory:
        log = wal.WriteAheadLog(directory)
        log.recover(0)
        records = [Change("upsert", [f"id-{i}"], [{"i": i}], rng.random((1, 1024), np.float32), rng.random((1, 8), np.float32), i + 1, "m" * 64) for i in range(args.records)]
        log.append(b"".join(wal.encode(r) for r in records))
        log.close()
        mib = sum(p.stat().st_size for p in Path(directory).iterdir()) / 2**20
        compare(f"recover a log of {args.records} records ({mib:.0f} MiB)", lambda: old_wal.WriteAheadLog(directory).recover(0), lambda: wal.WriteAheadLog(directory).recover(0))
    database = rng.standard_normal((1_000_000, 16)).astype(np.float32)
    for n_queries in (1, 64):
        queries = rng.standard_normal((n_queries, 16)).astype(np.float32)
        compare(f"exact top-10, 10^6 x 16, {n_queries} queries", lambda: old_exact.top_k_inner_product(database, queries, 10), lambda: exact.top_k_inner_product(database, queries, 10))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# Log reader and exact search, before and after issue 21\n\n`python bench/reader_ab.py` (best of the runs, one process, shared 2-core machine)\n\n" + "\n".join(rows) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
