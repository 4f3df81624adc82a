"""Export both towers to ONNX with the test-time CCA projection and the final normalisation folded in.

Writes ``<out>/audio_encoder.onnx``, ``<out>/visual_encoder.onnx`` and ``<out>/manifest.json``
(the contract with ``index/`` and ``service/``: they read files, never import this package).
Every file is written to a temporary name and renamed into place; a model whose ONNX Runtime
output differs from PyTorch by more than ``tolerance`` is refused and nothing is written.

The parity check runs on real held-out clips when it can find them (the test split of ``data``,
else of the checkpoint's own data source), else on seeded Gaussian inputs around the training
feature statistics, both as one batch and one clip at a time (the dynamic batch axis); the
manifest records which inputs were used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.cca import LinearCCA
from training.data import DataError, PairedFeatures, atomic_write, load_features
from training.model import MODALITIES, Tower
from training.synthetic import generate
from training.train import load_checkpoint

SCHEMA_VERSION = 1
OPSET = 20  # ONNX Runtime ≥ 1.17; LayerNormalization is a native op since 17
ONNX_FILES = {"audio": "audio_encoder.onnx", "visual": "visual_encoder.onnx"}


class ExportError(RuntimeError):
    pass


class ServingEncoder(nn.Module):
    """(B, D_in) raw features -> (B, E') served embedding: tower, then normalise((z − μ) A)."""

    def __init__(self, tower: Tower, cca_mean: np.ndarray | None, cca_proj: np.ndarray | None):
        super().__init__()
        self.tower = tower
        self.use_cca = cca_proj is not None
        if self.use_cca:
            self.register_buffer("cca_mean", torch.as_tensor(cca_mean, dtype=torch.float32))
            self.register_buffer("cca_proj", torch.as_tensor(cca_proj, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.tower(x)
        if self.use_cca:
            z = F.normalize((z - self.cca_mean) @ self.cca_proj, dim=-1)
        return z


def serving_encoders(model, cca: LinearCCA | None) -> dict[str, ServingEncoder]:
    sides = {"audio": "a", "visual": "b"}
    out = {}
    for modality in MODALITIES:
        mean = None if cca is None else getattr(cca, f"mean_{sides[modality]}")
        proj = None if cca is None else getattr(cca, f"proj_{sides[modality]}")
        out[modality] = ServingEncoder(model.towers[modality], mean, proj).eval()
    return out


def _onnx_bytes(module: nn.Module, d_in: int) -> bytes:
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        torch.onnx.export(
            module,
            (torch.zeros(2, d_in),),
            tmp,
            input_names=["features"],
            output_names=["embedding"],
            dynamic_axes={"features": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and gives a compact graph
        )
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def check_parity(module: nn.Module, onnx_blob: bytes, inputs: np.ndarray) -> float:
    """Max |ONNX Runtime − PyTorch| over ``inputs``, both in float32.

    Raises :class:`ExportError` when either output holds NaN or Inf: NaN compares false with any
    tolerance, and equal infinities differ by NaN, so a plain comparison could let them through.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_blob, providers=["CPUExecutionProvider"])
    got = session.run(None, {"features": inputs.astype(np.float32)})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(inputs.astype(np.float32))).numpy()
    for name, output in (("ONNX Runtime", got), ("PyTorch", want)):
        bad = ~np.isfinite(output)
        if bad.any():
            raise ExportError(f"{name} output is not finite ({int(bad.any(axis=1).sum())} of {len(output)} rows hold NaN or Inf); not written")
    return float(np.max(np.abs(got - want)))


PARITY_ROWS = 256  # held-out clips per modality in the parity check
SINGLE_ROWS = 4  # of which this many are also checked one at a time (batch size 1)


def held_out_inputs(cfg, payload: dict, data=None) -> tuple[dict[str, np.ndarray] | None, str]:
    """({modality: (N, D) test-split features}, description), or (None, why not) when none is found."""
    source = data if data is not None else payload.get("data_source", "")
    try:
        if isinstance(source, PairedFeatures):
            features = source
        elif str(source).startswith("synthetic") and getattr(cfg, "synthetic", None) is not None:
            features = generate(cfg.synthetic)  # the run's own seeded synthetic set
        elif source and Path(str(source)).exists():
            features = load_features(source)
        else:
            return None, f"data source {str(source)!r} not found"
        test = features.with_default_split().subset("test")
    except (DataError, OSError) as err:
        return None, f"data source unreadable ({err})"
    if len(test) == 0:
        return None, "empty test split"
    rows = np.random.default_rng(0).permutation(len(test))[:PARITY_ROWS]
    return {m: getattr(test, m)[rows] for m in MODALITIES}, f"{len(rows)} held-out test clips of {features.source}"


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, tolerance: float = 1e-5, parity_inputs: dict | None = None, data=None
) -> dict:
    """Export a training run; returns the manifest.

    ``parity_inputs`` maps modality -> (N, D) features; otherwise the test split of ``data`` (a path,
    ``synthetic`` or PairedFeatures) or of the checkpoint's data source is used.
    """
    cfg, model, cca, payload, checkpoint_hash = load_checkpoint(Path(run_dir))
    if parity_inputs is not None:
        parity_source = f"given inputs ({', '.join(f'{m}: {len(x)} rows' for m, x in parity_inputs.items())})"
    else:
        parity_inputs, parity_source = held_out_inputs(cfg, payload, data)
        if parity_inputs is None:  # seeded inputs around the training distribution
            parity_source = f"64 seeded Gaussian inputs around the training feature statistics ({parity_source})"
    encoders = serving_encoders(model, cca if cfg.cca.enabled else None)
    metrics_path = Path(run_dir) / "metrics.json"
    test_metrics = json.loads(metrics_path.read_text()).get("test") if metrics_path.is_file() else None
    dims = {"audio": payload["audio_dim"], "visual": payload["visual_dim"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blobs, parity = {}, {}
    for modality, encoder in encoders.items():
        blobs[modality] = _onnx_bytes(encoder, dims[modality])
        tower = model.towers[modality]
        if parity_inputs is not None:
            inputs = parity_inputs[modality]
        else:
            rng = np.random.default_rng(0)
            inputs = tower.feature_mean.numpy() + tower.feature_std.numpy() * rng.standard_normal((64, dims[modality]))
        try:
            parity[modality] = max(
                check_parity(encoder, blobs[modality], inputs),
                *(check_parity(encoder, blobs[modality], inputs[i : i + 1]) for i in range(min(SINGLE_ROWS, len(inputs)))),
            )
        except ExportError as err:
            raise ExportError(f"{modality} encoder: {err}") from None
        if not parity[modality] <= tolerance:
            raise ExportError(f"{modality} encoder: ONNX Runtime differs from PyTorch by {parity[modality]:.2e} > {tolerance:.0e}; not written")
    use_cca = cca is not None and cfg.cca.enabled
    embedding_dim = int(cca.proj_a.shape[1]) if use_cca else cfg.model.embedding_dim
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {m: ONNX_FILES[m] for m in MODALITIES},
        "input_dims": dims,
        "embedding_dim": embedding_dim,
        "normalised": True,
        "metric": "inner_product",
        "opset": OPSET,
        "feature_scaling": {
            m: {"mean": model.towers[m].feature_mean.tolist(), "std": model.towers[m].feature_std.tolist(), "applied_in_graph": True}
            for m in MODALITIES
            if hasattr(model.towers[m], "feature_mean")
        },
        "test_time_cca": {"enabled": use_cca, "n_components": cfg.cca.n_components, "ridge": cfg.cca.ridge},
        "source_checkpoint_sha256": checkpoint_hash,
        "data_source": payload.get("data_source", ""),
        "evaluation": {"val": payload.get("val_metrics"), "test": test_metrics},
        "parity_max_abs_diff": parity,
        "parity_check": {"inputs": parity_source, "tolerance": tolerance, "batch_sizes": ["all", 1], "dtype": "float32"},
        "onnx_sha256": {m: hashlib.sha256(b).hexdigest() for m, b in blobs.items()},
    }
    for modality, blob in blobs.items():
        atomic_write(out / ONNX_FILES[modality], blob)
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest
