"""The batch indexing job: reader → ONNX embedder → embedding shard, per partition; then the index.

Layout of a job directory::

    job.json                              model hash, collection, partitions (the job's identity)
    embeddings/<modality>/<partition>.npz embeddings (n, E) float32, ids (UTF-8 bytes + ends), metadata (JSON)
    <modality>/                           the FAISS index (index.faiss, items.bin, info.json)

Every file is written to a temporary name and renamed into place, so a killed job leaves only
whole shards behind. A restarted job skips every partition whose shard is there and embeds the
rest; the index is then rebuilt from all shards in partition order, so an interrupted and an
uninterrupted run end with the same index, and a second run changes nothing. ``engine="ray"``
runs the embedding step on Ray Data: ``map_batches`` over the pending partitions with one
:class:`PartitionEmbedder` (one ONNX session) per worker.

An id that occurs in two rows (two partitions, or twice in one) stops the index stage with a
:class:`DuplicateIdError` naming both places; with ``on_duplicate="last-wins"`` the later row (in
partition order, then row order) replaces the earlier and the summary counts the replaced rows.
The check costs nothing extra: each partition's upsert already looks its ids up in the item
table's sorted keys, and the item count says whether any was there already.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from avdata.atomic import atomic_write
from index.embedder import Embedder
from index.items import RepeatedIdError
from index.sources import Partition, Source
from index.store import VectorIndex, apply_build_params

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
TRAIN_SAMPLE = 100_000  # rows sampled across partitions to train IVF / PQ quantisers (at least)
ROWS_PER_LIST = 40  # k-means of an IVF with L lists wants ≥ 39·L points (FAISS warns below that)
ON_DUPLICATE = ("refuse", "last-wins")  # what to do with an id that occurs in two rows of a collection


class JobError(ValueError):
    """A job that cannot run (an output directory of another job, a bad factory string)."""


class DuplicateIdError(JobError):
    """A collection with one id in two rows (refused unless ``on_duplicate="last-wins"``)."""


def shard_path(out_dir: Path, modality: str, partition: str) -> Path:
    return out_dir / "embeddings" / modality / f"{partition}.npz"


def embed_partition(embedder: Embedder, source: Source, partition: str, modality: str, out_dir: Path, batch_size: int) -> tuple[int, int]:
    """Read, embed and atomically write one partition; returns its row count and the bad records it skipped."""
    chunk = source.read(partition, modality)
    batches = [embedder.embed(modality, chunk.features[i : i + batch_size]) for i in range(0, len(chunk.features), batch_size)]
    embeddings = np.concatenate(batches) if batches else np.zeros((0, embedder.embedding_dim), np.float32)  # every record skipped
    write_shard(shard_path(out_dir, modality, partition), embeddings, chunk.ids, chunk.metadata)
    return len(embeddings), chunk.skipped


def write_shard(path: Path, embeddings: np.ndarray, ids: list[str], metadata: list[dict | None] | None) -> None:
    """One embedding shard, written atomically; ids as UTF-8 end to end (a quarter of numpy's UTF-32 strings)."""
    encoded = [i.encode() for i in ids]
    id_ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, id_bytes=np.frombuffer(b"".join(encoded), np.uint8), id_ends=id_ends, metadata=np.array(json.dumps(metadata)))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def read_shard(path: Path) -> tuple[np.ndarray, list[str], list[dict | None] | None]:
    with np.load(path, allow_pickle=False) as z:
        if "ids" in z:  # a shard written before ids were stored as UTF-8
            ids = z["ids"].tolist()
        else:
            blob, ends = z["id_bytes"].tobytes(), z["id_ends"].tolist()
            ids = [blob[start:end].decode() for start, end in zip([0, *ends[:-1]], ends)]
        return z["embeddings"], ids, json.loads(str(z["metadata"]))


def _shard_rows(path: Path) -> int:
    with np.load(path, allow_pickle=False) as z:
        return int(z["id_ends"].shape[0]) if "id_ends" in z else int(z["embeddings"].shape[0])


def _is_done(path: Path, rows: int | None) -> bool:
    """A readable shard of ``rows`` rows (any count when the source knows it only once read)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return rows is None or z["embeddings"].shape[0] == rows
    except (OSError, ValueError, KeyError, EOFError):
        return False  # missing or unreadable: embed it (again)


class PartitionEmbedder:
    """Ray Data callable class: one ONNX session per worker, each batch a list of partitions."""

    def __init__(self, model_dir: str, source: Source, out_dir: str, device: str, batch_size: int):
        self.embedder = Embedder(model_dir, device=device, intra_op_threads=1)  # one core per worker
        self.source, self.out_dir, self.batch_size = source, Path(out_dir), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [
            embed_partition(self.embedder, self.source, str(p), str(m), self.out_dir, self.batch_size)
            for p, m in zip(batch["partition"], batch["modality"])
        ]
        rows, skipped = zip(*done)
        return {"partition": batch["partition"], "modality": batch["modality"], "rows": np.array(rows), "skipped": np.array(skipped)}


@dataclass
class JobSummary:
    out_dir: Path
    source: str
    factory: str
    engine: str
    providers: dict[str, str]
    partitions: int = 0  # over all modalities
    embedded: int = 0  # partitions embedded by this run
    skipped: int = 0  # partitions already done by an earlier run
    rows_embedded: int = 0
    embed_seconds: float = 0.0
    index_seconds: float = 0.0
    items: dict[str, int] = field(default_factory=dict)
    on_duplicate: str = "refuse"
    replaced: dict[str, int] = field(default_factory=dict)  # rows replaced by a later row with the same id (last-wins)
    bad_skipped: int | None = None  # bad records (or whole shards) skipped by this run; None: not asked to skip

    def lines(self) -> list[str]:
        rate = self.rows_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0
        lines = [
            f"collection: {self.source}",
            f"partitions: {self.partitions} ({self.embedded} embedded now, {self.skipped} already done)",
            f"embedded:   {self.rows_embedded} clips in {self.embed_seconds:.1f} s ({rate:.0f} clips/s, engine {self.engine}, {self.providers})",
            f"indexes:    {', '.join(f'{m} {n} items' for m, n in self.items.items())}; factory {self.factory}; built in {self.index_seconds:.1f} s",
        ]
        if self.on_duplicate == "last-wins":  # said even when 0: the reader asked for it
            counts = ", ".join(f"{m} {n}" for m, n in self.replaced.items())
            lines.append(f"duplicates: {counts} rows replaced by a later row with the same id (last wins)")
        if self.bad_skipped is not None:
            lines.append(f"skipped:    {self.bad_skipped} bad records/shards (--skip-bad)")
        return [*lines, f"written to: {self.out_dir}"]


def _check_job_file(out_dir: Path, card: dict) -> None:
    path = out_dir / JOB_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("manifest_sha256", "source_sha256", "partition_rows", "partitions"):
            if old.get(key) != card[key]:
                raise JobError(f"{out_dir} holds a job of another model or collection ({key} differs); use a new --out or delete it")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(card, indent=2).encode())


def _check_factory(factory: str, dim: int, build_params: dict | None = None) -> int:
    """Rows to train ``factory`` on (0: needs no training); a clear error for a string FAISS cannot parse."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        apply_build_params(index, factory, build_params)
        if index.is_trained:
            return 0
        ivf = faiss.try_extract_index_ivf(index)
        return max(TRAIN_SAMPLE, ROWS_PER_LIST * ivf.nlist) if ivf is not None else TRAIN_SAMPLE
    except RuntimeError as err:
        reason = re.sub(r"^Error in .*? at \S+: ", "", " ".join(str(err).split()))  # drop FAISS's C++ location
        raise JobError(f"--factory {factory!r}: not a FAISS factory string FAISS can build ({reason})") from None


def _training_sample(paths: list[Path], rows: list[int], wanted: int, seed: int = 0) -> np.ndarray:
    """Up to ``wanted`` embeddings, drawn from every partition in proportion to its size (seeded)."""
    rng, total, out = np.random.default_rng(seed), sum(rows), []
    for path, n in zip(paths, rows):
        take = n if total <= wanted else int(np.ceil(wanted * n / total))
        with np.load(path, allow_pickle=False) as z:
            embeddings = z["embeddings"]  # not the ids: a sample of 10^8 rows reads every shard
        out.append(embeddings if take >= n else embeddings[np.sort(rng.choice(n, take, replace=False))])
    return np.concatenate(out)


class RowOrigins:
    """The partition and row each label of a job's index came from. A partition's rows get
    consecutive labels, so one first label per partition places any row (memory per partition,
    not per item). Exact while no row is dropped, i.e. whenever duplicates are refused."""

    def __init__(self) -> None:
        self._partitions: list[str] = []
        self._first_labels: list[int] = []

    def add(self, partition: str, first_label: int) -> None:
        self._partitions.append(partition)
        self._first_labels.append(first_label)

    def of(self, label: int) -> tuple[str, int]:
        at = bisect.bisect_right(self._first_labels, label) - 1
        return self._partitions[at], label - self._first_labels[at]


def _duplicate_message(modality: str, item_id: str, first: tuple[str, int], second: tuple[str, int]) -> str:
    return (
        f"id {item_id!r} occurs twice in the {modality} collection: partition {first[0]!r} row {first[1]} and partition {second[0]!r} row {second[1]}; "
        "make the ids unique, or keep the later row with --on-duplicate last-wins (the embeddings are kept: a rerun does not embed again)"
    )


def _keep_last(embeddings: np.ndarray, ids: list[str], metadata: list[dict | None] | None):
    """One partition's rows without the earlier rows of an id it repeats (called only when it does)."""
    keep = sorted({item_id: row for row, item_id in enumerate(ids)}.values())
    return embeddings[keep], [ids[r] for r in keep], None if metadata is None else [metadata[r] for r in keep]


def _add_partition(index: VectorIndex, origins: RowOrigins, modality: str, partition: str, shard, on_duplicate: str) -> int:
    """Upsert one partition's rows; returns how many earlier rows they replaced (refused: DuplicateIdError)."""
    embeddings, ids, metadata = shard
    first_label, live_before, dropped = index.items.rows, len(index), 0
    try:
        index.upsert(embeddings, ids, metadata)
    except RepeatedIdError as err:  # an id twice within this partition; nothing was changed
        if on_duplicate == "refuse":
            raise DuplicateIdError(_duplicate_message(modality, err.item_id, (partition, err.rows[0]), (partition, err.rows[1]))) from None
        embeddings, ids, metadata = _keep_last(embeddings, ids, metadata)
        dropped = len(shard[1]) - len(ids)
        index.upsert(embeddings, ids, metadata)
    origins.add(partition, first_label)
    replaced = live_before + len(ids) - len(index)  # found by the upsert's own lookup: no second one
    if replaced and on_duplicate == "refuse":
        # Refusing, no row had died before this upsert: the dead ones are exactly those it replaced.
        label = int(np.flatnonzero(~index.items.alive[:first_label])[0])
        item_id = index.items.ids_of(np.array([label]))[0]
        raise DuplicateIdError(_duplicate_message(modality, item_id, origins.of(label), (partition, ids.index(item_id))))
    return dropped + replaced


def _index_from_shards(
    out_dir: Path, modality: str, partitions: list[Partition], factory: str, dim: int, manifest_hash: str, search_params: dict | None,
    build_params: dict | None, on_duplicate: str,
) -> tuple[VectorIndex, int]:
    """The saved index of one modality and the count of rows replaced by a later row with the same id."""
    paths = [shard_path(out_dir, modality, p.name) for p in partitions]
    wanted = _check_factory(factory, dim)
    sample = _training_sample(paths, [p.rows if p.rows is not None else _shard_rows(path) for p, path in zip(partitions, paths)], wanted) if wanted else None
    index = VectorIndex.empty(dim, factory, manifest_hash, training_vectors=sample, build_params=build_params)
    if search_params:
        index.set_search_params(**search_params)
    origins, replaced = RowOrigins(), 0
    for partition, path in zip(partitions, paths):
        replaced += _add_partition(index, origins, modality, partition.name, read_shard(path), on_duplicate)
    if replaced:
        log.warning("%s: %d rows replaced by a later row with the same id (--on-duplicate last-wins)", modality, replaced)
    index.items.consolidate()  # one lookup run: the index is written once, then read many times
    index.save(out_dir / modality)
    return index, replaced


def build_index_from_shards(
    out_dir: Path, modality: str, partitions: list[Partition], factory: str, dim: int, manifest_hash: str, search_params: dict | None,
    build_params: dict | None = None, on_duplicate: str = "refuse",
) -> VectorIndex:
    return _index_from_shards(out_dir, modality, partitions, factory, dim, manifest_hash, search_params, build_params, on_duplicate)[0]


def _embed_local(embedder: Embedder, source, pending, out_dir, batch_size, bar, on_partition) -> tuple[int, int]:
    """(rows embedded, bad records skipped)."""
    total = [0, 0]
    for modality, partition in pending:
        rows, skipped = embed_partition(embedder, source, partition.name, modality, out_dir, batch_size)
        bar.update(rows)
        total[0], total[1] = total[0] + rows, total[1] + skipped
        if on_partition is not None:
            on_partition(modality, partition.name)
    return total[0], total[1]


def _embed_ray(model_dir: Path, source, pending, out_dir: Path, device: str, batch_size: int, workers: int, bar) -> tuple[int, int]:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=workers + 1, include_dashboard=False, log_to_driver=False)  # +1: Ray Data's own tasks
    items = [{"partition": p.name, "modality": m} for m, p in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs = {"model_dir": str(model_dir), "source": source, "out_dir": str(out_dir), "device": device, "batch_size": batch_size}
    embedded = dataset.map_batches(PartitionEmbedder, fn_constructor_kwargs=kwargs, batch_size=1, concurrency=workers, num_cpus=1)
    rows = skipped = 0
    for row in embedded.iter_rows():
        bar.update(int(row["rows"]))
        rows, skipped = rows + int(row["rows"]), skipped + int(row["skipped"])
    return rows, skipped


def run_job(
    model_dir: str | Path,
    source: Source,
    out_dir: str | Path,
    factory: str = "Flat",
    device: str = "auto",
    engine: str = "local",
    batch_size: int = 4096,
    workers: int = 1,
    search_params: dict | None = None,
    build_params: dict | None = None,
    progress: bool = True,
    on_partition: Callable[[str, str], None] | None = None,
    on_duplicate: str = "refuse",
) -> JobSummary:
    """Embed every pending partition of ``source``, then build and save one index per modality.

    ``on_partition(modality, partition)`` is called after each partition is written (local engine).
    ``on_duplicate``: ``"refuse"`` (an id in two rows is a :class:`DuplicateIdError`) or
    ``"last-wins"`` (the later row replaces the earlier; counted in ``summary.replaced``).
    """
    if engine not in ("local", "ray"):
        raise JobError(f"unknown engine {engine!r}; expected 'local' or 'ray'")
    if on_duplicate not in ON_DUPLICATE:
        raise JobError(f"unknown on_duplicate {on_duplicate!r}; expected one of {ON_DUPLICATE}")
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    embedder = Embedder(model_dir, device=device)
    _check_factory(factory, embedder.embedding_dim, build_params)  # fail before hours of embedding, not after
    plan = {m: source.partitions(m) for m in source.modalities()}
    card = {
        "manifest_sha256": embedder.manifest_hash,
        "source": source.description,
        "source_sha256": source.fingerprint(),
        "partition_rows": getattr(source, "partition_rows", None),
        "partitions": {m: [[p.name, p.rows] for p in parts] for m, parts in plan.items()},
    }
    _check_job_file(out_dir, card)
    summary = JobSummary(out_dir, source.description, factory, engine, embedder.providers, on_duplicate=on_duplicate)
    pending = []
    for modality, parts in plan.items():
        for p in parts:
            summary.partitions += 1
            if _is_done(shard_path(out_dir, modality, p.name), p.rows):
                summary.skipped += 1
            else:
                pending.append((modality, p))
    # Partition by partition, both modalities together: a record shard is parsed once for both
    # (RecordShards keeps the last shard read), not once per modality.
    pending.sort(key=lambda item: (item[1].name, item[0]))
    known = all(p.rows is not None for _, p in pending)  # record shards: counted as they are read
    total = sum(p.rows for _, p in pending) if known else None
    log.info("%s: %d partitions, %d to embed (%s clips), %d already done", source.description, summary.partitions, len(pending), total if known else "?", summary.skipped)
    start = time.perf_counter()
    with tqdm(total=total, desc="embed", unit="clip", disable=not progress) as bar:
        if engine == "ray" and pending:
            summary.rows_embedded, bad = _embed_ray(model_dir, source, pending, out_dir, device, batch_size, workers, bar)
        else:
            summary.rows_embedded, bad = _embed_local(embedder, source, pending, out_dir, batch_size, bar, on_partition)
    if getattr(source, "skip_bad", False):
        summary.bad_skipped = bad
    summary.embedded = len(pending)
    summary.embed_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for modality, parts in plan.items():
        index, summary.replaced[modality] = _index_from_shards(
            out_dir, modality, parts, factory, embedder.embedding_dim, embedder.manifest_hash, search_params, build_params, on_duplicate
        )
        summary.items[modality] = len(index)
    summary.index_seconds = time.perf_counter() - start
    return summary
