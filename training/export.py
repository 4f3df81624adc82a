"""Export both towers to ONNX with the test-time CCA projection and the final normalisation folded in.

Writes ``<out>/audio_encoder.onnx``, ``<out>/visual_encoder.onnx`` and ``<out>/manifest.json``
(the contract with ``index/`` and ``service/``: they read files, never import this package).
Every file is written to a temporary name and renamed into place; a model whose ONNX Runtime
output differs from PyTorch by more than ``tolerance`` is refused and nothing is written.
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
from training.model import MODALITIES, Tower
from training.train import load_checkpoint

SCHEMA_VERSION = 1
OPSET = 17
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
    """Max |ONNX Runtime − PyTorch| over ``inputs``, both in float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_blob, providers=["CPUExecutionProvider"])
    got = session.run(None, {"features": inputs.astype(np.float32)})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(inputs.astype(np.float32))).numpy()
    return float(np.max(np.abs(got - want)))


def _atomic_write(path: Path, blob: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tolerance: float = 1e-5, parity_inputs: dict | None = None) -> dict:
    """Export a training run; returns the manifest. ``parity_inputs`` maps modality -> (N, D) features."""
    cfg, model, cca, payload, checkpoint_hash = load_checkpoint(Path(run_dir))
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
        else:  # held-out style inputs around the training distribution, seeded
            rng = np.random.default_rng(0)
            inputs = tower.feature_mean.numpy() + tower.feature_std.numpy() * rng.standard_normal((64, dims[modality]))
        parity[modality] = check_parity(encoder, blobs[modality], inputs)
        if not parity[modality] <= tolerance:
            raise ExportError(f"{modality} encoder: ONNX Runtime differs from PyTorch by {parity[modality]:.2e} > {tolerance:.0e}; not written")
    use_cca = cca is not None and cfg.cca.enabled
    embedding_dim = int(cca.proj_a.shape[1]) if use_cca else cfg.model.out_dim
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
        },
        "test_time_cca": {"enabled": use_cca, "n_components": cfg.cca.n_components, "ridge": cfg.cca.ridge},
        "source_checkpoint_sha256": checkpoint_hash,
        "data_source": payload.get("data_source", ""),
        "evaluation": {"val": payload.get("val_metrics"), "test": test_metrics},
        "parity_max_abs_diff": parity,
        "onnx_sha256": {m: hashlib.sha256(b).hexdigest() for m, b in blobs.items()},
    }
    for modality, blob in blobs.items():
        _atomic_write(out / ONNX_FILES[modality], blob)
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest
