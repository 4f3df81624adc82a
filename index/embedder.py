"""The one feature→embedding path: exported ONNX encoders run by ONNX Runtime.

The CUDA provider is used when present; which provider runs is reported (``Embedder.providers``)
and a CPU fallback is logged as a warning, never silent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
SUPPORTED_SCHEMA_VERSIONS = (1,)
MODALITIES = ("audio", "visual")


class ModelError(RuntimeError):
    """A model directory that cannot be used (missing files, unknown schema)."""


class InputError(ValueError):
    """Feature vectors that do not fit the model (width, NaN/Inf, shape)."""


def load_manifest(model_dir: str | Path) -> tuple[dict, str]:
    """(manifest, sha256 of manifest.json); the hash identifies the model version."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        blob = path.read_bytes()
        manifest = json.loads(blob)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; export a model first (python -m training export)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        raise ModelError(f"{path}: schema_version {manifest.get('schema_version')!r} not supported (supported: {SUPPORTED_SCHEMA_VERSIONS})")
    for key, kind in (("files", dict), ("input_dims", dict), ("embedding_dim", int)):
        if not isinstance(manifest.get(key), kind):
            raise ModelError(f"{path}: '{key}' is missing or not a {kind.__name__}; re-export the model")
    missing = [m for m in MODALITIES if m not in manifest["files"] or m not in manifest["input_dims"]]
    if missing:
        raise ModelError(f"{path}: no {missing} entry in 'files' or 'input_dims'; re-export the model")
    for modality in MODALITIES:  # names inside the model directory: a manifest must not make the loader read /etc or ../another
        name = manifest["files"][modality]
        if not isinstance(name, str) or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise ModelError(f"{path}: files.{modality} {name!r} points outside the model directory; re-export the model")
    return manifest, hashlib.sha256(blob).hexdigest()


def choose_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``device`` in {"auto", "cuda", "cpu"}."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ModelError(f"device 'cuda' requested but onnxruntime offers only {available} (install the gpu extra: onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


class Embedder:
    """Loads ``audio_encoder.onnx`` / ``visual_encoder.onnx`` and embeds (B, D) float32 features."""

    def __init__(self, model_dir: str | Path, device: str = "auto", intra_op_threads: int = 0):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.manifest, self.manifest_hash = load_manifest(self.model_dir)
        self.input_dims: dict[str, int] = {m: int(d) for m, d in self.manifest["input_dims"].items()}
        self.embedding_dim = int(self.manifest["embedding_dim"])
        wanted = choose_providers(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.sessions = {}
        for modality in MODALITIES:
            path = self.model_dir / self.manifest["files"][modality]
            try:
                blob = path.read_bytes()
            except OSError as err:
                raise ModelError(f"{path}: cannot be read ({err.strerror}); re-export the model") from None
            # The manifest names the exact encoder files it was written with: a half-finished
            # re-export must not pair a new encoder with an old one under the old version.
            expected = self.manifest.get("onnx_sha256", {}).get(modality)
            if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
                raise ModelError(f"{path}: does not match the sha256 in {MANIFEST_NAME} (an interrupted export?); re-export the model")
            try:
                self.sessions[modality] = ort.InferenceSession(blob, options, providers=wanted)
            except Exception as err:  # onnxruntime raises its own exception types for bad files
                raise ModelError(f"{path}: cannot be loaded by ONNX Runtime ({type(err).__name__}: {err})") from None
            width = self.sessions[modality].get_inputs()[0].shape[1]
            if isinstance(width, int) and width != self.input_dims[modality]:
                raise ModelError(f"{path}: takes {width} features but {MANIFEST_NAME} says {self.input_dims[modality]}; re-export the model")
        self.providers = {m: s.get_providers()[0] for m, s in self.sessions.items()}
        if device != "cpu" and any(p != "CUDAExecutionProvider" for p in self.providers.values()):
            log.warning("ONNX Runtime runs on %s (no CUDA provider available): CPU fallback", self.providers)
        else:
            log.info("ONNX Runtime providers: %s", self.providers)

    def validate(self, modality: str, vectors) -> np.ndarray:
        """Check modality, shape, width and finiteness; return C-contiguous float32 (B, D)."""
        if modality not in self.input_dims:
            raise InputError(f"unknown modality {modality!r}; expected one of {sorted(self.input_dims)}")
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise InputError(f"expected a non-empty list of {modality} vectors (B, {self.input_dims[modality]}), got shape {x.shape}")
        if x.shape[1] != self.input_dims[modality]:
            raise InputError(f"{modality} vectors must have {self.input_dims[modality]} values each, got {x.shape[1]}")
        bad = ~np.isfinite(x)
        if bad.any():
            raise InputError(f"{modality} vectors hold NaN or Inf (first in vector {int(np.argwhere(bad)[0][0])})")
        return x

    def embed(self, modality: str, vectors) -> np.ndarray:
        """(B, D_in) features -> (B, E) unit-norm float32 embeddings; InputError when finite but huge
        features overflow the encoder (a NaN row would score NaN against everything)."""
        x = self.validate(modality, vectors)
        embeddings = self.sessions[modality].run(None, {"features": x})[0]
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        if bad.size:
            raise InputError(f"{modality} vector {int(bad[0])} embeds to NaN or Inf (its values overflow the encoder); scale the features to the range the model was trained on")
        return embeddings
