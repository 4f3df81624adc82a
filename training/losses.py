"""Every loss of HSC-MAE and its baselines, as pure functions of tensors (spec §4).

Each function is non-negative, takes its temperatures and weights as arguments and returns a scalar
tensor (diagnostics, where any, in a separate dict). The tests check each one against a slow
float64 loop, forward and gradient. Vocabulary: ``B`` batch, ``D`` feature width, ``E`` embedding
width, ``k`` neighbours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error, over all values or only the masked ones.

    pred, target (B, D); mask (B, D) bool or None. With a mask: Σ mask·(pred−target)² / Σ mask, and
    0 (still attached to the graph) when nothing was masked, e.g. at ρ = 0. Source: MAE
    ``forward_loss`` (masked only); the HSC-MAE reference averages over all values (mask=None).
    """
    sq = (pred - target) ** 2
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp(min=1.0)


def dcca_loss(h1: torch.Tensor, h2: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DCCA in a non-negative form: 1 − mean_i ρ_i², computed in float64 outside autocast.

    h1 (B, E1), h2 (B, E2), B ≥ 2. Centre, Σ11 = H1ᵀH1/(B−1) + r·I, Σ22 likewise, Σ12 = H1ᵀH2/(B−1);
    the canonical correlations ρ_i are the singular values of T = Σ11^{-1/2} Σ12 Σ22^{-1/2}, so
    Σ ρ_i² = ‖T‖_F² = tr(Σ11⁻¹ Σ12 Σ22⁻¹ Σ21). That identity needs only linear solves, no
    eigen- or singular-vector gradients (unstable when correlations tie). Divided by
    min(E1, E2) it lies in [0, 1) with the ridge. Source: Andrew et al. 2013; spec §4.2 [ours].
    Diagnostics: ``correlations`` (min(E1,E2),) detached, descending.
    """
    if h1.shape[0] < 2 or h1.shape[0] != h2.shape[0]:
        raise ValueError(f"DCCA needs ≥2 paired rows, got {h1.shape[0]} and {h2.shape[0]}")
    device_type = h1.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        a, b = h1.double(), h2.double()
        a, b = a - a.mean(0), b - b.mean(0)
        n = a.shape[0] - 1
        s11 = a.T @ a / n + ridge * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        s22 = b.T @ b / n + ridge * torch.eye(b.shape[1], dtype=b.dtype, device=b.device)
        s12 = a.T @ b / n
        # tr(Σ11⁻¹ Σ12 Σ22⁻¹ Σ21) = Σ_ij (Σ11⁻¹Σ12)_ij (Σ22⁻¹Σ21)ᵀ_ij
        left = torch.linalg.solve(s11, s12)  # (E1, E2)
        right = torch.linalg.solve(s22, s12.T)  # (E2, E1)
        k = min(a.shape[1], b.shape[1])
        loss = 1.0 - (left * right.T).sum() / k
        with torch.no_grad():
            w1 = _inverse_sqrt(s11)
            w2 = _inverse_sqrt(s22)
            corr = torch.linalg.svdvals(w1 @ s12 @ w2)[:k]
    return loss.to(h1.dtype), {"correlations": corr.float()}


def _inverse_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    eigval, eigvec = torch.linalg.eigh(sigma)
    return (eigvec / eigval.clamp(min=1e-12).sqrt()) @ eigvec.T


@torch.no_grad()
def teacher_neighbour_weights(z_a: torch.Tensor, z_v: torch.Tensor, k: int, tau_w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft top-k positives mined from the teacher (spec §4.3); no gradient.

    z_a, z_v (B, E) teacher embeddings. Fused z̄ = normalise((z_a + z_v)/2), S = z̄z̄ᵀ; the diagonal
    and entries ≤ 0 are never neighbours; each row keeps its top-k valid entries and weights them
    w_ij = softmax_j(S_ij/τ_w) over those kept (fewer than k when fewer are valid). Returns
    w (B, B) with rows summing to 1 or to 0, and has_neighbour (B,) bool, False for rows with no
    valid neighbour (their w row is all zero).
    """
    zbar = F.normalize((z_a + z_v) / 2, dim=-1)
    s = zbar @ zbar.T
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    s = s.masked_fill(eye | (s <= 0), float("-inf"))
    kk = min(k, b - 1)
    if kk <= 0:
        return torch.zeros_like(s), torch.zeros(b, dtype=torch.bool, device=s.device)
    vals, idx = s.topk(kk, dim=1)  # -inf for invalid entries
    has = torch.isfinite(vals[:, 0])
    logits = torch.where(torch.isfinite(vals), vals / tau_w, torch.full_like(vals, float("-inf")))
    soft = torch.softmax(torch.where(has[:, None], logits, torch.zeros_like(logits)), dim=1)
    soft = torch.where(torch.isfinite(vals) & has[:, None], soft, torch.zeros_like(soft))
    w = torch.zeros_like(s).scatter(1, idx, soft)
    return w, has


def soft_topk_infonce(z_q: torch.Tensor, z_k: torch.Tensor, weights: torch.Tensor, has_neighbour: torch.Tensor, tau: float, pair_weight: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One direction of the teacher-mined soft top-k InfoNCE (spec §4.3).

    z_q, z_k (B, E) student MAE-path embeddings of the query and key modality; weights (B, B) and
    has_neighbour (B,) from :func:`teacher_neighbour_weights`. ℓ_ij = z_q,i·z_k,j/τ,
    P_i = β·e^{ℓ_ii} + Σ_j w_ij e^{ℓ_ij},  N_i = Σ_{j≠i} (1−w_ij) e^{ℓ_ij},  L_i = −log(P_i/(P_i+N_i)).
    ``pair_weight`` β: the clip's own partner is a positive with that weight; None = the reference,
    which drops the partner from positives and negatives alike. A row with no positive at all (no
    valid neighbour and β None or 0) is left out of the mean; with no such row left the loss is 0
    (attached to the graph). Computed in log space: log(P+N) = logsumexp over j≠i of ℓ_ij (+ log β at
    j=i). Diagnostics: ``rows_used`` (fraction of rows in the mean).
    """
    b = z_q.shape[0]
    logits = (z_q @ z_k.T).float() / tau  # (B, B)
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    beta = 0.0 if pair_weight is None else float(pair_weight)
    pos_w = weights.float().masked_fill(eye, beta)  # weights have a zero diagonal
    all_w = torch.ones_like(logits).masked_fill(eye, beta)  # (w + (1−w)(1−δ)) = 1 off the diagonal
    neg_inf = torch.full_like(logits, float("-inf"))
    used = has_neighbour | torch.tensor(beta > 0, device=logits.device)
    # Rows left out get a harmless stand-in (the diagonal) so no -inf reaches logsumexp's gradient.
    pos_w = torch.where(used[:, None], pos_w, eye.float())
    all_w = torch.where(used[:, None], all_w, eye.float())
    log_pos = torch.logsumexp(torch.where(pos_w > 0, logits + pos_w.clamp(min=1e-30).log(), neg_inf), dim=1)
    log_all = torch.logsumexp(torch.where(all_w > 0, logits + all_w.clamp(min=1e-30).log(), neg_inf), dim=1)
    per_row = torch.where(used, log_all - log_pos, torch.zeros_like(log_all))
    n_used = used.sum()
    loss = per_row.sum() / n_used.clamp(min=1)
    return loss, {"rows_used": n_used.float() / b}


def symmetric_soft_topk_infonce(
    z_a: torch.Tensor, z_v: torch.Tensor, teacher_a: torch.Tensor, teacher_v: torch.Tensor, k: int, tau: float, tau_w: float, pair_weight: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(A→V + V→A)/2 of :func:`soft_topk_infonce` with teacher-mined weights (S is symmetric)."""
    w, has = teacher_neighbour_weights(teacher_a, teacher_v, k, tau_w)
    a2v, diag = soft_topk_infonce(z_a, z_v, w, has, tau, pair_weight)
    v2a, _ = soft_topk_infonce(z_v, z_a, w, has, tau, pair_weight)
    return (a2v + v2a) / 2, diag


def paired_infonce(z_a: torch.Tensor, z_v: torch.Tensor, tau: float) -> torch.Tensor:
    """CLIP-style symmetric InfoNCE over B pairs (Radford et al. 2021); z_* (B, E) unit-norm.

    L = ½[CE(z_a z_vᵀ/τ, diag) + CE(z_v z_aᵀ/τ, diag)]; the partner is the only positive.
    """
    logits = (z_a @ z_v.T).float() / tau
    target = torch.arange(len(z_a), device=z_a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def distillation_loss(z_student: torch.Tensor, z_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ‖z_s − z_t‖² (= 2 − 2cos for unit vectors), teacher detached. (B, E) each."""
    return ((z_student - z_teacher.detach()) ** 2).sum(dim=1).mean()


def uncertainty_weighted_sum(terms: dict[str, torch.Tensor], log_vars: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Kendall et al. 2018: Σ_i exp(−s_i)·L_i + s_i with learnable log-variances s_i.

    ``terms`` name -> non-negative scalar; ``log_vars`` name -> scalar parameter (keep it clamped
    to a sane range after each step: with s unbounded below a term near 0 would take all the
    weight). Returns the total and the weights exp(−s_i) as floats for logging.
    """
    total = sum(torch.exp(-log_vars[name]) * value + log_vars[name] for name, value in terms.items())
    return total, {name: math.exp(-float(log_vars[name].detach())) for name in terms}


def fixed_weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_i λ_i·L_i with fixed weights (warm-up, and the fixed-weight ablation)."""
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())
