"""``python -m service serve``: check the model and index, print a curl to try, serve with uvicorn.
``python -m service example``: write a request body holding one audio query from a feature directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from index.embedder import ModelError
from index.store import IndexLoadError


def _serve(args) -> int:
    import uvicorn

    from service.app import Engine, create_app
    from service.settings import Settings

    overrides = {k: v for k, v in (("model_dir", args.model), ("index_dir", args.index)) if v is not None}
    settings = Settings(**overrides)
    try:
        engine = Engine.load(settings)  # fail fast, with one line, before binding the port
    except (ModelError, IndexLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url = f"http://{args.host}:{args.port}"
    body = f"@{args.example}" if args.example else '\'{"modality": "audio", "vectors": [[...]], "top_k": 10}\''
    print(f"\navsearch serving on {url}  (API docs: {url}/docs)")
    print(f"try:\n  curl -s -X POST {url}/v1/search -H 'Content-Type: application/json' -d {body}\n", flush=True)
    uvicorn.run(create_app(settings, engine), host=args.host, port=args.port, log_level="info")
    return 0


def _example(args) -> int:
    """The last test-split clip's audio vector (a clip the model never trained on)."""
    audio = np.load(args.data / "audio_features.npy")
    split_path = args.data / "split.npy"
    rows = np.flatnonzero(np.load(split_path) == "test") if split_path.is_file() else np.arange(len(audio))
    body = {"modality": "audio", "vectors": [audio[rows[-1]].astype(float).round(6).tolist()], "top_k": args.top_k}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the search API with uvicorn")
    p.add_argument("--model", type=Path, help="exported model directory (default: $AVSEARCH_MODEL_DIR or artifacts/model)")
    p.add_argument("--index", type=Path, help="index directory (default: $AVSEARCH_INDEX_DIR or artifacts/index)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--example", type=Path, help="a JSON request body to show in the printed curl")
    p.set_defaults(func=_serve)
    p = sub.add_parser("example", help="write an example search request from a feature directory")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.set_defaults(func=_example)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
