"""Batch indexing job: features → embeddings (ONNX) → one FAISS index per modality."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index.embedder import MODALITIES, Embedder
from index.store import VectorIndex

log = logging.getLogger(__name__)


def embed_in_batches(embedder: Embedder, modality: str, features: np.ndarray, batch_size: int = 4096, progress: bool = True) -> np.ndarray:
    out = np.empty((len(features), embedder.embedding_dim), dtype=np.float32)
    for start in tqdm(range(0, len(features), batch_size), desc=f"embed {modality}", disable=not progress, unit="batch"):
        out[start : start + batch_size] = embedder.embed(modality, features[start : start + batch_size])
    return out


def build_indexes(model_dir: str | Path, data: str | Path, out_dir: str | Path, factory: str = "Flat", device: str = "auto", progress: bool = True) -> dict[str, VectorIndex]:
    """Embed every clip of ``data`` (all splits) and write ``out_dir/{audio,visual}``."""
    from training.data import load_features  # numpy-only data layer, shared with training

    features = load_features(data)
    embedder = Embedder(model_dir, device=device)
    indexes = {}
    for modality in MODALITIES:
        embeddings = embed_in_batches(embedder, modality, getattr(features, modality), progress=progress)
        indexes[modality] = VectorIndex.build(embeddings, features.ids, factory, embedder.manifest_hash)
        indexes[modality].save(Path(out_dir) / modality)
        log.info("%s index: %d items, factory %s", modality, len(features), factory)
    return indexes
