"""Command line: ``python -m index build --model MODEL --data DATA --out INDEX_DIR [options]``.

Exit status 0 on success, 2 with one ``error: ...`` line for bad input or a bad model/index.
"""

from __future__ import annotations

import argparse
import logging
import sys

from index.build import build_job
from index.store import IndexLoadError


def _name_value(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        return name, float(value) if "." in value else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER, e.g. nprobe=32") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="embed a feature collection and build its FAISS indexes (resumable)")
    p.add_argument("--model", required=True, help="exported model directory (manifest.json + ONNX)")
    p.add_argument("--data", required=True, help="feature directory, HDF5 file, folder of .npy shards, TFRecord or Parquet/Arrow shards (a folder, a file or a glob), or 'synthetic'")
    p.add_argument("--out", required=True, help="job directory: gets job.json, embeddings/, audio/ and visual/")
    p.add_argument("--factory", default="Flat", help="FAISS factory string: Flat (exact, default), IVF4096,Flat, IVF4096,PQ16, HNSW32 ...")
    p.add_argument("--search-param", action="append", type=_name_value, default=[], metavar="NAME=VALUE", help="kept with the index, e.g. nprobe=32 or efSearch=128")
    p.add_argument("--build-param", action="append", type=_name_value, default=[], metavar="NAME=VALUE", help="e.g. efConstruction=200 (HNSW: better graph, slower build)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="ray: embed on Ray Data, one ONNX session per worker")
    p.add_argument("--workers", type=int, default=1, help="Ray workers (engine ray)")
    p.add_argument("--partition-rows", type=int, default=65536, help="rows per partition when the data is not a shard folder")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per ONNX call")
    p.add_argument(
        "--on-duplicate", default="refuse", choices=["refuse", "last-wins"],
        help="an id in two rows: refuse the collection (default, exit 2 naming both rows) or keep the later row and count the replaced ones",
    )
    p.add_argument(
        "--skip-bad", action="store_true", default=None,
        help="TFRecord/table shards: skip a bad record (or unreadable shard) and count it in the summary, instead of stopping at the first",
    )
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build loads is noise here

    if args.workers < 1 or args.batch_size < 1:
        print("error: --workers and --batch-size must be ≥ 1", file=sys.stderr)
        return 2
    try:
        summary = build_job(
            args.model, args.data, args.out, args.factory, args.device, not args.no_progress, args.engine, args.partition_rows,
            batch_size=args.batch_size, workers=args.workers, search_params=dict(args.search_param), build_params=dict(args.build_param),
            on_duplicate=args.on_duplicate, skip_bad=args.skip_bad,
        )
    except (ValueError, RuntimeError, FileNotFoundError, IndexLoadError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
