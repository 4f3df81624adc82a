"""Batch indexing: features → embeddings (ONNX) → one FAISS index per modality (see :mod:`index.job`)."""

from __future__ import annotations

import logging
from pathlib import Path

from index.job import JobSummary, run_job
from index.sources import open_source
from index.store import VectorIndex

log = logging.getLogger(__name__)
PARTITION_ROWS = 65536  # rows per partition of a collection loaded whole (a shard folder uses its shards)


def build_job(
    model_dir: str | Path,
    data: str | Path,
    out_dir: str | Path,
    factory: str = "Flat",
    device: str = "auto",
    progress: bool = True,
    engine: str = "local",
    partition_rows: int = PARTITION_ROWS,
    skip_bad: bool | None = None,
    **options,
) -> JobSummary:
    """Run the resumable batch job over ``data`` (any data-layer format); ``skip_bad`` skips and
    counts bad records of TFRecord/table shards (None: as the collection's ``avdata.json`` says)."""
    if partition_rows < 1:
        raise ValueError(f"partition rows must be ≥ 1, got {partition_rows}")
    return run_job(model_dir, open_source(data, partition_rows, skip_bad=skip_bad), out_dir, factory, device, engine, progress=progress, **options)


def build_indexes(model_dir: str | Path, data: str | Path, out_dir: str | Path, factory: str = "Flat", device: str = "auto", progress: bool = True) -> dict[str, VectorIndex]:
    """Embed every clip of ``data`` (all splits) and write ``out_dir/{audio,visual}``; returns the indexes."""
    summary = build_job(model_dir, data, out_dir, factory, device, progress)
    for line in summary.lines():
        log.info(line)
    return {m: VectorIndex.load(Path(out_dir) / m) for m in summary.items}
