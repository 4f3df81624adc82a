"""Training: a loop that knows nothing about the model, validation-based selection, test-time CCA.

Selection uses the validation split only; the test split is touched once, by ``evaluate``.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.cca import LinearCCA, fit_linear_cca
from training.config import Config, config_from_dict, config_to_dict
from training.data import PairedFeatures
from training.metrics import cross_modal_metrics
from training.model import AVModel

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def paired_infonce(z_a: torch.Tensor, z_v: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE over a batch of B pairs; z_* (B, E) unit-norm."""
    logits = z_a @ z_v.T / temperature
    target = torch.arange(len(z_a), device=z_a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def embed_all(model: AVModel, modality: str, x: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """(N, D) features -> (N, E) embeddings, in eval mode, in batches."""
    model.eval()
    device = next(model.parameters()).device
    out = [model.embed(modality, torch.from_numpy(x[i : i + batch_size]).to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def fit_test_time_cca(model: AVModel, train: PairedFeatures, cfg: Config) -> LinearCCA:
    """Linear CCA on embeddings of the clean training split (spec §5)."""
    return fit_linear_cca(embed_all(model, "audio", train.audio), embed_all(model, "visual", train.visual), cfg.cca.n_components, cfg.cca.ridge)


def evaluate_model(model: AVModel, cca: LinearCCA | None, data: PairedFeatures) -> dict[str, float]:
    """Cross-modal metrics of ``data`` with the CCA projection (when given) and without it."""
    z_a, z_v = embed_all(model, "audio", data.audio), embed_all(model, "visual", data.visual)
    plain = cross_modal_metrics(z_a, z_v, data.labels)
    if cca is None:
        return plain
    out = cross_modal_metrics(cca.transform(z_a, "a"), cca.transform(z_v, "b"), data.labels)
    out.update({f"{k}_no_cca": v for k, v in plain.items() if k in ("a2v", "v2a", "avg")})
    return out


@dataclass
class TrainResult:
    model: AVModel
    cca: LinearCCA | None
    val_metrics: dict
    best_epoch: int
    history: list[dict]


def train(cfg: Config, data: PairedFeatures, show_progress: bool = True) -> TrainResult:
    """Paired-InfoNCE training with validation-mAP selection; labels are read for validation only."""
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    train_split, val_split = data.subset("train"), data.subset("val")
    model = AVModel(data.audio_dim, data.visual_dim, cfg.model)
    for modality in ("audio", "visual"):
        x = torch.from_numpy(getattr(train_split, modality))
        model.towers[modality].set_scaling(x.mean(0), x.std(0))
    model.to(device)

    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    n = len(train_split)
    steps_per_epoch = max(1, n // cfg.train.batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total_steps, 1.0))))
    audio = torch.from_numpy(train_split.audio).to(device)
    visual = torch.from_numpy(train_split.visual).to(device)
    generator = torch.Generator().manual_seed(cfg.train.seed)

    best = (-1.0, 0, copy.deepcopy(model.state_dict()), None)
    history: list[dict] = []
    bar = tqdm(range(cfg.train.epochs), desc="train", disable=not show_progress, unit="epoch")
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator)
        losses = []
        for step in range(steps_per_epoch):
            rows = order[step * cfg.train.batch_size : (step + 1) * cfg.train.batch_size].to(device)
            loss = paired_infonce(model.embed("audio", audio[rows]), model.embed("visual", visual[rows]), cfg.train.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        cca = fit_test_time_cca(model, train_split, cfg) if cfg.cca.enabled else None
        val = evaluate_model(model, cca, val_split)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_avg": val["avg"]})
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_map=f"{val['avg']:.3f}")
        if val["avg"] > best[0]:
            best = (val["avg"], epoch, copy.deepcopy(model.state_dict()), val)
    model.load_state_dict(best[2])
    cca = fit_test_time_cca(model, train_split, cfg) if cfg.cca.enabled else None
    return TrainResult(model.cpu(), cca, best[3], best[1], history)


def save_checkpoint(path: Path, cfg: Config, data: PairedFeatures, result: TrainResult) -> str:
    """Write the checkpoint atomically; it embeds its config. Returns its sha256."""
    payload = {
        "config": config_to_dict(cfg),
        "audio_dim": data.audio_dim,
        "visual_dim": data.visual_dim,
        "state_dict": result.model.state_dict(),
        "cca": result.cca.to_dict() if result.cca is not None else None,
        "val_metrics": result.val_metrics,
        "best_epoch": result.best_epoch,
        "history": result.history,
        "data_source": data.source,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    blob = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return hashlib.sha256(blob).hexdigest()


def load_checkpoint(run_dir: Path) -> tuple[Config, AVModel, LinearCCA | None, dict, str]:
    """(config, model in eval mode, cca, raw payload, sha256 of the file)."""
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (train a model first: python -m training train ...)")
    blob = path.read_bytes()
    payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    cfg = config_from_dict(payload["config"])
    model = AVModel(payload["audio_dim"], payload["visual_dim"], cfg.model)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    cca = LinearCCA.from_dict(payload["cca"]) if payload["cca"] is not None else None
    return cfg, model, cca, payload, hashlib.sha256(blob).hexdigest()
