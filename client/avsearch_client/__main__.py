"""Command line over the client: ``python -m avsearch_client search --url URL --audio query.npy --top-k 10``.

Every command takes --url (default $AVSEARCH_URL or http://127.0.0.1:8000), --api-key (default
$AVSEARCH_API_KEY) and --json (the answer as JSON instead of a table). Errors: exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from avsearch_client.errors import AvsearchError
from avsearch_client.models import MODALITIES, SearchResults
from avsearch_client.sync import Client


def _vectors(args: argparse.Namespace) -> tuple[str, np.ndarray]:
    """(modality, array) from --audio FILE or --visual FILE."""
    given = [(m, getattr(args, m)) for m in MODALITIES if getattr(args, m) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --audio FILE.npy or --visual FILE.npy")
    modality, path = given[0]
    return modality, np.load(path, allow_pickle=False)


def _search(client: Client, args: argparse.Namespace) -> Any:
    options = {"top_k": args.top_k, "target": args.target, "score_threshold": args.threshold, "filter": json.loads(args.filter) if args.filter else None}
    if args.ids:
        if args.modality is None:
            raise ValueError("--ids needs --modality (the modality of the stored items)")
        return client.search(args.modality, ids=args.ids, **options)
    modality, queries = _vectors(args)
    return client.search(modality, queries, **options)


def _upsert(client: Client, args: argparse.Namespace) -> Any:
    modality, vectors = _vectors(args)
    ids = [line.strip() for line in Path(args.ids).read_text().splitlines() if line.strip()]
    metadata = None
    if args.metadata:
        metadata = [json.loads(line) for line in Path(args.metadata).read_text().splitlines() if line.strip()]
    return client.upsert(modality, ids, vectors, metadata, batch_size=args.batch_size, progress=args.progress, concurrency=args.concurrency)


def _embed(client: Client, args: argparse.Namespace) -> Any:
    modality, vectors = _vectors(args)
    embeddings = client.embed(modality, vectors)
    np.save(args.out, embeddings)
    return {"embeddings": str(args.out), "shape": list(embeddings.shape)}


def _snapshot(client: Client, args: argparse.Namespace) -> Any:
    if args.action == "create":
        return client.create_snapshot()
    if args.action == "list":
        return client.list_snapshots()
    if args.name is None:
        raise ValueError(f"snapshot {args.action} needs the snapshot's name")
    if args.action == "download":
        return {"downloaded": str(client.download_snapshot(args.name, args.out or f"{args.name}.tar"))}
    client.delete_snapshot(args.name)
    return {"deleted": args.name}


def _ready(client: Client, args: argparse.Namespace) -> Any:
    model = client.wait_until_ready(args.wait) if args.wait else client.ready()
    return {"ready": model is not None, "model": model}


COMMANDS = {
    "search": _search,
    "upsert": _upsert,
    "embed": _embed,
    "get": lambda c, a: c.get(a.modality, a.id),
    "delete": lambda c, a: c.delete(a.modality, a.id),
    "info": lambda c, a: c.info(),
    "ready": _ready,
    "reload": lambda c, a: c.reload(a.model_dir, a.index_dir),
    "snapshot": _snapshot,
}


def plain(value: Any) -> Any:
    """JSON-ready form of a result (dataclasses, numpy arrays, result lists)."""
    if isinstance(value, SearchResults):
        return {"model": value.model, "results": [[dataclasses.asdict(h) for h in hits] for hits in value]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "raw"}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def table(value: Any) -> str:
    if isinstance(value, SearchResults):
        rows = [("query", "rank", "id", "score", "metadata")]
        for q, hits in enumerate(value):
            rows += [(str(q), str(r + 1), h.id, f"{h.score:.4f}", json.dumps(h.metadata) if h.metadata else "") for r, h in enumerate(hits)]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4] for row in rows) + f"\nmodel {value.model}"
    data = plain(value)
    if isinstance(data, list):
        return "\n".join(table(v) + "\n" for v in value) if data else "(none)"
    if isinstance(data, dict):
        width = max(len(k) for k in data)
        return "\n".join(f"{k.ljust(width)}  {v if isinstance(v, str) else json.dumps(v)}" for k, v in data.items())
    return str(data)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("AVSEARCH_URL", "http://127.0.0.1:8000"), help="server URL (default $AVSEARCH_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="API key (default $AVSEARCH_API_KEY)")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    common.add_argument("--json", action="store_true", help="print the answer as JSON")
    vectors = argparse.ArgumentParser(add_help=False)
    for m in MODALITIES:
        vectors.add_argument(f"--{m}", type=Path, metavar="FILE.npy", help=f"{m} feature vectors, (n, D) or (D,)")

    top = argparse.ArgumentParser(prog="python -m avsearch_client", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("search", parents=[common, vectors], help="nearest items for feature vectors or stored ids")
    p.add_argument("--ids", nargs="+", help="stored ids to query with (with --modality) instead of vectors")
    p.add_argument("--modality", choices=MODALITIES, help="modality of --ids")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--target", choices=MODALITIES, help="modality to search (default: the other one)")
    p.add_argument("--threshold", type=float, help="drop hits scoring below this")
    p.add_argument("--filter", help='metadata filter as JSON, e.g. \'{"genre": "jazz"}\'')
    p = sub.add_parser("upsert", parents=[common, vectors], help="add or replace items, in batches under the server's limits")
    p.add_argument("--ids", required=True, type=Path, help="text file, one id per line, one per vector")
    p.add_argument("--metadata", type=Path, help="JSON lines file, one object (or null) per item")
    p.add_argument("--batch-size", type=int, help="items per request (default: the server's limit)")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    p.add_argument("--progress", action="store_true", help="show progress on stderr")
    p = sub.add_parser("embed", parents=[common, vectors], help="served embeddings of feature vectors, saved as .npy")
    p.add_argument("--out", required=True, type=Path)
    for name, what in (("get", "a stored item"), ("delete", "delete a stored item")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("modality", choices=MODALITIES)
        p.add_argument("id")
    sub.add_parser("info", parents=[common], help="model, index sizes, limits")
    p = sub.add_parser("ready", parents=[common], help="whether the server is ready")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait up to this long for it")
    p = sub.add_parser("reload", parents=[common], help="swap in a model + index version")
    p.add_argument("--model-dir")
    p.add_argument("--index-dir")
    p = sub.add_parser("snapshot", parents=[common], help="snapshots: create, list, download NAME [--out FILE], delete NAME")
    p.add_argument("action", choices=("create", "list", "download", "delete"))
    p.add_argument("name", nargs="?")
    p.add_argument("--out", type=Path, help="file to download into (default NAME.tar)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.url, args.api_key, timeout=args.timeout) as client:
            result = COMMANDS[args.command](client, args)
    except (AvsearchError, ValueError, OSError) as err:  # a refused request, a bad file, an unreachable server
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plain(result), indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
