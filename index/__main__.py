"""Command line: ``python -m index build --model MODEL --data DATA --out INDEX_DIR``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m index")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="embed a feature collection and build its FAISS indexes")
    p.add_argument("--model", required=True, help="exported model directory (manifest.json + ONNX)")
    p.add_argument("--data", required=True, help="feature directory, HDF5 file or 'synthetic'")
    p.add_argument("--out", required=True, help="index directory (gets audio/ and visual/)")
    p.add_argument("--factory", default="Flat", help="FAISS factory string (default exact inner product)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from index.build import build_indexes

    try:
        indexes = build_indexes(args.model, args.data, args.out, args.factory, args.device)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"built {', '.join(f'{m}: {len(ix)} items' for m, ix in indexes.items())} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
