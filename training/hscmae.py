"""HSC-MAE's training step: student MAE path, student CCA path, EMA teacher (spec §3–4).

The same step serves the baselines and ablations: :class:`ObjectiveConfig` switches each term on
or off (see ``training.baselines.METHODS``). The step returns the loss to minimise and named
terms for logging; it never touches labels. Vocabulary: ``B`` batch, ``E`` embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training import losses
from training.model import AVModel, value_mask

TERMS = ("recon_intra", "recon_cross", "dcca", "soft_nce", "paired_nce", "distill")


@dataclass
class ObjectiveConfig:
    mask_ratio: float = 0.3  # ρ: probability that a feature value is zeroed on the MAE path
    recon_intra: bool = True  # reconstruct x_a from audio, x_v from visual (fused tokens)
    recon_cross: bool = True  # reconstruct x_v from audio alone and x_a from visual alone
    recon_masked_only: bool = False  # intra terms average over masked values only (MAE) vs all (reference)
    fusion: bool = True  # intra decoders read the cross-attention-fused representation
    dcca: bool = True  # DCCA on the clean student path (off during warm-up)
    dcca_ridge: float = 1e-3  # r added to Σ11, Σ22
    soft_nce: bool = True  # teacher-mined soft top-k InfoNCE on the MAE path
    k: int = 5  # neighbours mined per row
    tau: float = 0.05  # InfoNCE temperature τ (soft top-k and paired)
    tau_w: float = 0.05  # temperature of the neighbour weights
    pair_weight: float | None = 1.0  # β: the true partner is also a positive; null = reference (excluded)
    paired_nce: bool = False  # CLIP-style paired InfoNCE (baselines)
    paired_nce_masked: bool = False  # paired InfoNCE on the masked MAE path (CAV-MAE) instead of clean
    distill: bool = False  # MSE of student MAE-path embeddings to the teacher's (spec: optional; off: it hurt on validation, training/README.md)
    learned_weights: bool = True  # Kendall weights after warm-up; False = every weight 1 (training/README.md: chosen on validation)
    log_var_min: float = -2.0  # clamp of the log-variances s_i (max weight e²)
    log_var_max: float = 4.0
    log_var_lr: float = 1e-3  # learning rate of the s_i
    warmup_steps: int = 200  # optimiser steps with fixed weights, DCCA off, cross-recon ramping 0→1
    teacher: bool = True  # keep an EMA teacher and evaluate/export it (False: the student)
    momentum_start: float = 0.95  # EMA momentum m at the first step ...
    momentum_end: float = 0.999  # ... rising (cosine) to this at the last


def active_terms(cfg: ObjectiveConfig) -> list[str]:
    on = {
        "recon_intra": cfg.recon_intra,
        "recon_cross": cfg.recon_cross,
        "dcca": cfg.dcca,
        "soft_nce": cfg.soft_nce,
        "paired_nce": cfg.paired_nce,
        "distill": cfg.distill,
    }
    if (cfg.soft_nce or cfg.distill) and not cfg.teacher:
        raise ValueError("soft_nce and distill need the EMA teacher (objective.teacher: true)")
    names = [t for t in TERMS if on[t]]
    if not names:
        raise ValueError("objective: every loss term is switched off")
    return names


class TaskWeights(nn.Module):
    """Learnable log-variances s_i, one per active term (Kendall et al. 2018)."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.log_vars = nn.ParameterDict({n: nn.Parameter(torch.zeros(())) for n in names})

    @torch.no_grad()
    def clamp_(self, low: float, high: float) -> None:
        for p in self.log_vars.values():
            p.clamp_(low, high)


def momentum_at(step: int, total_steps: int, start: float, end: float) -> float:
    """EMA momentum, cosine from ``start`` at step 0 to ``end`` at the last step (BYOL schedule)."""
    t = min(step / max(total_steps - 1, 1), 1.0)
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_T ← m·θ_T + (1−m)·θ_S; buffers (BatchNorm statistics, feature scaling) are copied."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.lerp_(ps.detach(), 1.0 - momentum)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


class _FrozenBatchNormStats:
    """Use batch statistics but leave running statistics alone (momentum 0) inside the block.

    The masked path's statistics are not those of clean inputs; letting them into the running
    averages would skew the evaluated (clean, eval-mode) teacher.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [m.momentum for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc):
        for m, momentum in zip(self.norms, self.saved):
            m.momentum = momentum


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    terms: dict[str, float]  # each active term's value (unweighted)
    weights: dict[str, float]  # the weight each term got this step
    diagnostics: dict[str, float]  # e.g. mean canonical correlation, rows used by soft top-k


def hscmae_step(
    student: AVModel,
    teacher: AVModel | None,
    task_weights: TaskWeights,
    cfg: ObjectiveConfig,
    x_a: torch.Tensor,
    x_v: torch.Tensor,
    generator: torch.Generator,
    step: int,
) -> StepOutput:
    """One batch of raw paired features x_a (B, D_a), x_v (B, D_v) -> loss and terms.

    ``step`` is the optimiser step about to be taken, which drives the warm-up.
    """
    names = active_terms(cfg)
    warm = step < cfg.warmup_steps
    if warm and "dcca" in names and len(names) > 1:  # DCCA alone (the baseline) has no warm-up
        names = [n for n in names if n != "dcca"]
    xs = {"audio": student.towers["audio"].scale(x_a), "visual": student.towers["visual"].scale(x_v)}
    terms: dict[str, torch.Tensor] = {}
    diagnostics: dict[str, float] = {}

    z_t = None
    if teacher is not None and ({"soft_nce", "distill"} & set(names)):
        with torch.no_grad():
            z_t = {m: teacher.embed(m, x) for m, x in (("audio", x_a), ("visual", x_v))}

    needs_mae = bool({"recon_intra", "recon_cross", "soft_nce", "distill"} & set(names)) or (cfg.paired_nce and cfg.paired_nce_masked)
    if needs_mae:
        masked, masks = {}, {}
        for m in ("audio", "visual"):
            masked[m], masks[m] = value_mask(xs[m], cfg.mask_ratio, generator)
        with _FrozenBatchNormStats(student):
            out = student.forward_mae(masked["audio"], masked["visual"], fuse=cfg.fusion)
        if "recon_intra" in names:
            use = masks if cfg.recon_masked_only else {"audio": None, "visual": None}
            terms["recon_intra"] = losses.reconstruction_loss(out.recon["audio"], xs["audio"], use["audio"]) + losses.reconstruction_loss(out.recon["visual"], xs["visual"], use["visual"])
        if "recon_cross" in names:
            terms["recon_cross"] = losses.reconstruction_loss(out.recon["audio2visual"], xs["visual"]) + losses.reconstruction_loss(out.recon["visual2audio"], xs["audio"])
        if "soft_nce" in names:
            terms["soft_nce"], diag = losses.symmetric_soft_topk_infonce(out.z["audio"], out.z["visual"], z_t["audio"], z_t["visual"], cfg.k, cfg.tau, cfg.tau_w, cfg.pair_weight)
            diagnostics["soft_nce_rows_used"] = float(diag["rows_used"])
        if "distill" in names:
            terms["distill"] = losses.distillation_loss(out.z["audio"], z_t["audio"]) + losses.distillation_loss(out.z["visual"], z_t["visual"])
        if "paired_nce" in names and cfg.paired_nce_masked:
            terms["paired_nce"] = losses.paired_infonce(out.z["audio"], out.z["visual"], cfg.tau)

    if "dcca" in names or ("paired_nce" in names and not cfg.paired_nce_masked):
        z_clean = {"audio": student.embed("audio", x_a), "visual": student.embed("visual", x_v)}
        if "dcca" in names:
            terms["dcca"], diag = losses.dcca_loss(z_clean["audio"], z_clean["visual"], cfg.dcca_ridge)
            diagnostics["mean_correlation"] = float(diag["correlations"].mean())
        if "paired_nce" in names and not cfg.paired_nce_masked:
            terms["paired_nce"] = losses.paired_infonce(z_clean["audio"], z_clean["visual"], cfg.tau)

    if warm or not cfg.learned_weights:
        fixed = {n: 1.0 for n in terms}
        if warm and "recon_cross" in fixed:
            fixed["recon_cross"] = min(step / cfg.warmup_steps, 1.0)
        total, weights = losses.fixed_weighted_sum(terms, fixed), fixed
    else:
        total, weights = losses.uncertainty_weighted_sum(terms, dict(task_weights.log_vars.items()))
    return StepOutput(total, {n: float(v.detach()) for n, v in terms.items()}, weights, diagnostics)
