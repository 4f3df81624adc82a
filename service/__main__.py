"""Command line of the service (errors: exit code 2 and one line on stderr).

``python -m service serve``: load the model and index (fail fast), print a curl to try, serve with uvicorn.
``python -m service prepare --data DATA``: build the index for the configured model unless an up-to-date
one is there (the compose indexing job; item changes made through the API survive a re-run).
``python -m service restore FILE``: make the index directory the content of a snapshot file.
``python -m service example``: write a request body holding one audio query from a feature directory.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from index.embedder import MODALITIES, ModelError, load_manifest
from index.store import IndexLoadError
from service.served import check_not_moved, point_link  # light: no web framework, no engine


def _settings(args):
    from service.settings import Settings

    overrides = {k: v for k, v in (("model_dir", args.model), ("index_dir", args.index), ("host", getattr(args, "host", None))) if v is not None}
    return Settings(**overrides)


def _serve(args) -> int:
    import uvicorn

    from service.app import create_app, limit_threads
    from service.engine import Engine
    from service.timeouts import deadline_protocol

    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload asked for while loading is moot (this load reads the paths now); the app handles SIGHUP once up
    settings = _settings(args)
    if settings.workers > 1:
        from service.workers import serve

        return serve(settings, args.port, lambda engine: _announce(engine, settings, args))
    limit_threads(settings)
    check_not_moved(settings.index_dir)
    engine = Engine.load(settings.model_dir, settings.index_dir, settings.device, settings.intra_op_threads, settings.durability())  # before binding the port
    gc.collect()
    gc.freeze()  # the index's id maps (hundreds of thousands of objects) leave the cyclic GC's scans: shorter pauses
    _announce(engine, settings, args)
    uvicorn.run(
        create_app(settings, engine),
        host=settings.host,
        port=args.port,
        log_level="info",
        access_log=settings.access_log,
        http=deadline_protocol(settings.header_timeout, settings.body_timeout),  # slow clients cannot hold sockets
        limit_concurrency=settings.max_connections,
    )
    return 0


def _announce(engine, settings, args) -> None:
    url = f"http://{settings.host}:{args.port}"
    body = f"@{args.example}" if args.example else '\'{"modality": "audio", "vectors": [[...]], "top_k": 10}\''
    print(f"\navsearch serving model {engine.version} on {url}  (API docs: {url}/docs)")
    print(f"try:\n  curl -s -X POST {url}/v1/search -H 'Content-Type: application/json' -d {body}")
    print(f"or open the web console: {url}/ui/\n", flush=True)
    if settings.anonymous_writes_refused():
        print(f"no API key and bound to {settings.host}: item changes and reloads answer 403 (set AVSEARCH_API_KEY)", flush=True)


def _prepare(args) -> int:
    """Index ``--data`` with the configured model unless the index there was built from that model.

    The index is built into ``<index>-<model version>`` beside ``<index>``, which becomes a symlink
    to it (replaced atomically). A running API holds the resolved directory of its own version, so
    building the next version never clobbers the live one; SIGHUP then swaps the API over.
    """
    from index.build import build_indexes
    from index.store import VectorIndex
    from service.persist import load_index, swap_into_place

    settings = _settings(args)
    try:
        _, manifest_hash = load_manifest(settings.model_dir)
    except ModelError as err:
        raise ModelError(f"{err}. In compose: docker compose --profile train run --rm trainer (or copy a model into the models volume)") from None
    link = settings.index_dir
    check_not_moved(link)  # a reload moved the served index elsewhere: building from here would drop its writes
    if not args.rebuild:
        try:
            # Recover an interrupted save only when the index is gone: a running API may be saving
            # into this very directory, and recovery would delete its staging copy mid-save.
            sizes = {m: len((VectorIndex.load if (link / m).exists() else load_index)(link / m, manifest_hash)) for m in MODALITIES}
            print(f"index in {link} is up to date for model {manifest_hash[:12]} ({sizes}); nothing to do")
            return 0
        except IndexLoadError as err:
            logging.getLogger(__name__).info("building the index: %s", err)
    link.parent.mkdir(parents=True, exist_ok=True)
    version = link.parent / f"{link.name}-{manifest_hash[:12]}"
    staging = link.parent / f".{version.name}.build"
    shutil.rmtree(staging, ignore_errors=True)
    live = link.resolve() if link.exists() else None  # the version being served: never collected, its API items carried
    indexes = build_indexes(settings.model_dir, args.data, staging, args.factory, settings.device, progress=False)
    if live is not None and not args.rebuild:
        _carry_api_items(indexes, settings, live, staging)
    swap_into_place(staging, version)  # a kill leaves the old or the new version directory
    if link.exists() and not link.is_symlink():  # an index directory from before versioning: keep it aside
        os.rename(link, link.parent / f"{link.name}-previous-{int(time.time())}")
    point_link(link, version)  # atomic: readers see the old version or the new one
    print(f"built {', '.join(f'{m}: {len(ix)} items' for m, ix in indexes.items())} in {version} ({link} -> {version.name}) for model {manifest_hash[:12]}")
    from service.carry import collect_versions

    for gone in collect_versions(link, settings.keep_versions, [version, *([live] if live else [])]):
        print(f"deleted old version {gone.name} (AVSEARCH_KEEP_VERSIONS={settings.keep_versions})")
    return 0


def _carry_api_items(indexes: dict, settings, live: Path, staging: Path) -> None:
    """The items written through the API to the live version, re-embedded by the new model, with its
    deletions applied; their raw features go along (``api_items.npz``) for the version after."""
    from index.embedder import Embedder
    from service.carry import API_ITEMS_NAME, carry_over

    from service.carry import CARRIED_NAME, log_end

    embedder = Embedder(settings.model_dir, device=settings.device)
    seen = {m: log_end(live, m) for m in indexes}  # before reading: a change logged meanwhile is caught up at the swap
    carried = carry_over(indexes, embedder, live)
    (staging / CARRIED_NAME).write_text(json.dumps({"from": str(live), "lsn": seen}))
    for modality, index in indexes.items():
        index.save(staging / modality)
        (staging / modality / API_ITEMS_NAME).write_bytes(carried[modality].to_bytes())
        print(f"{modality}: {len(carried[modality].features)} items written through the API re-embedded, {len(carried[modality].deleted)} deletions kept")


def _restore(args) -> int:
    """Make the configured index directory (or --index) the content of a snapshot file."""
    from service.backup import restore

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
    from avdata.features import load_features  # numpy-only data layer: every format, validated

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
    p.add_argument("--max-bytes", type=int, help="refuse a snapshot whose files add up to more bytes (default 64 GiB: service.backup.RESTORE_MAX_BYTES)")
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
        from service.bodies import readable

        print(f"error: invalid AVSEARCH_* setting: {readable(err, prefix='settings')}", file=sys.stderr)
    except (ModelError, IndexLoadError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
