"""Command line of the service (errors: exit code 2 and one line on stderr).

``python -m service serve``: load the model and index (fail fast), print a curl to try, serve with uvicorn.
``python -m service prepare --data DATA``: build the index for the configured model unless an up-to-date
one is there (the compose indexing job; item changes made through the API survive a re-run: store.versions).
``python -m service restore FILE``: make the index directory the content of a snapshot file.
``python -m service example``: write a request body holding one audio query from a feature directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import signal
import sys
import time
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from avdata.features import load_features
from index.embedder import ModelError, load_manifest
from index.store import IndexLoadError
from service.app import create_app
from service.bodies import readable
from service.prefork import release_free_heap
from service.settings import Settings
from service.threads import limit_threads
from service.timeouts import deadline_protocol
from service.workers import serve as serve_workers
from store.collection import Collection
from store.served import check_not_moved
from store.snapshots import restore
from store.versions import prepare


def _settings(args) -> Settings:
    overrides = {k: v for k, v in (("model_dir", args.model), ("index_dir", args.index), ("host", getattr(args, "host", None))) if v is not None}
    return Settings(**overrides)


def _serve(args) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while loading is moot (this load reads the paths now); the app handles SIGHUP once up
    settings = _settings(args)
    if settings.workers > 1:
        return serve_workers(settings, args.port, lambda collection: _announce(collection, settings, args))
    limit_threads(settings)
    check_not_moved(settings.index_dir)
    collection = Collection.load(settings.model_dir, settings.index_dir, settings.device, settings.intra_op_threads, settings.store_config())  # before binding the port
    release_free_heap()
    gc.collect()
    gc.freeze()  # the index's id maps (hundreds of thousands of objects) leave the cyclic GC's scans: shorter pauses
    _announce(collection, settings, args)
    uvicorn.run(
        create_app(settings, collection),
        host=settings.host,
        port=args.port,
        log_level="info",
        access_log=settings.access_log,
        http=deadline_protocol(settings.header_timeout, settings.body_timeout),  # slow clients cannot hold sockets
        limit_concurrency=settings.max_connections,
    )
    return 0


def _announce(collection, settings, args) -> None:
    url = f"http://{settings.host}:{args.port}"
    body = f"@{args.example}" if args.example else '\'{"modality": "audio", "vectors": [[...]], "top_k": 10}\''
    print(f"\navsearch serving model {collection.version} on {url}  (API docs: {url}/docs)")
    print(f"try:\n  curl -s -X POST {url}/v1/search -H 'Content-Type: application/json' -d {body}")
    print(f"or open the web console: {url}/ui/\n", flush=True)
    if settings.anonymous_writes_refused():
        print(f"no API key and bound to {settings.host}: item changes and reloads answer 403 (set AVSEARCH_API_KEY)", flush=True)


def _prepare(args) -> int:
    """Index ``--data`` with the configured model unless the index there was built from that model
    (a new version beside it, with the API-written items carried over: store.versions.prepare)."""
    settings = _settings(args)
    try:
        load_manifest(settings.model_dir)
    except ModelError as err:
        raise ModelError(f"{err}. In compose: docker compose --profile train run --rm trainer (or copy a model into the models volume)") from None
    prepare(settings.model_dir, settings.index_dir, args.data, args.factory, settings.device, args.rebuild, settings.keep_versions, say=print)
    return 0


def _restore(args) -> int:
    """Make the configured index directory (or --index) the content of a snapshot file."""
    settings = _settings(args)
    try:
        _, manifest_hash = load_manifest(settings.model_dir)
    except ModelError as err:
        raise ModelError(f"{err} (the snapshot is checked against the model it will be served with; --model names it)") from None
    card = restore(args.file, settings.index_dir, manifest_hash, args.max_bytes)
    print(f"restored {args.file} into {Path(settings.index_dir).resolve()}: model {card['model']}, items {card['items']}, taken at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(card['created']))}")
    return 0


def _example(args) -> int:
    """The last test-split clip's audio vector (a clip the model never trained on)."""
    test = load_features(args.data).subset("test")
    body = {"modality": "audio", "vectors": [test.audio[-1].astype(float).round(6).tolist()], "top_k": args.top_k}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve the search API with uvicorn (settings: AVSEARCH_* variables, see service/README.md)")
    p.add_argument("--model", type=Path, help="exported model directory (default: $AVSEARCH_MODEL_DIR or artifacts/model)")
    p.add_argument("--index", type=Path, help="index directory (default: $AVSEARCH_INDEX_DIR or artifacts/index)")
    p.add_argument("--host", help="address to bind (default: $AVSEARCH_HOST or 127.0.0.1; off loopback, writes need AVSEARCH_API_KEY)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--example", type=Path, help="a JSON request body to show in the printed curl")
    p.set_defaults(func=_serve)
    p = sub.add_parser("prepare", help="build the index for the model unless an up-to-date one exists")
    p.add_argument("--model", type=Path, help="exported model directory (default: $AVSEARCH_MODEL_DIR)")
    p.add_argument("--index", type=Path, help="index directory (default: $AVSEARCH_INDEX_DIR)")
    p.add_argument("--data", required=True, help="any collection of the data layer (feature directory, .npy shards, HDF5, TFRecord or Parquet shards) or 'synthetic'")
    p.add_argument("--factory", default="Flat", help="FAISS factory string (default: exact inner product)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if the index is up to date (drops API item changes)")
    p.set_defaults(func=_prepare)
    p = sub.add_parser("restore", help="make the index directory the content of a snapshot file (stop the server first, or restore elsewhere and reload)")
    p.add_argument("file", type=Path, help="a snapshot file (GET /v1/admin/snapshots/{name}, or the snapshot directory)")
    p.add_argument("--model", type=Path, help="the model it will be served with (default: $AVSEARCH_MODEL_DIR)")
    p.add_argument("--index", type=Path, help="index directory to restore into (default: $AVSEARCH_INDEX_DIR); its content and log are replaced")
    p.add_argument("--max-bytes", type=int, help="refuse a snapshot whose files add up to more bytes (default 64 GiB: store.snapshots.RESTORE_MAX_BYTES)")
    p.set_defaults(func=_restore)
    p = sub.add_parser("example", help="write an example search request from a feature directory")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.set_defaults(func=_example)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it tried is noise here
    try:
        return args.func(args)
    except ValidationError as err:
        print(f"error: invalid AVSEARCH_* setting: {readable(err, prefix='settings')}", file=sys.stderr)
    except (ModelError, IndexLoadError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
