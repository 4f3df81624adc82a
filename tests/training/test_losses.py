"""Every loss against a slow float64 reference loop: forward and gradient, odd batch sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import losses


def _unit(b: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, e, generator=g, dtype=torch.float64), dim=1)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [t.grad for t in leaves]


# --- reconstruction ---------------------------------------------------------------------------------
def _recon_reference(pred, target, mask):
    total, count = pred.new_zeros(()), 0
    for i in range(pred.shape[0]):
        for j in range(pred.shape[1]):
            if mask is None or mask[i, j]:
                total = total + (pred[i, j] - target[i, j]) ** 2
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("masked", [False, True])
def test_reconstruction_matches_loop(masked):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 5, generator=g) < 0.4 if masked else None
    got, got_grad = _grads(lambda p: losses.reconstruction_loss(p, target, mask), pred)
    want, want_grad = _grads(lambda p: _recon_reference(p, target, mask), pred)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad[0], want_grad[0])


def test_masked_reconstruction_with_nothing_masked_is_zero_and_differentiable():
    pred = torch.randn(3, 4, requires_grad=True)
    loss = losses.reconstruction_loss(pred, torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(pred.grad == 0)


# --- DCCA -------------------------------------------------------------------------------------------
def _dcca_reference(h1, h2, ridge):
    """Covariances by a loop over rows, Σ^{-1/2} by eigendecomposition, correlations by SVD."""
    b = h1.shape[0]
    c1, c2 = h1 - h1.mean(0), h2 - h2.mean(0)
    s11 = sum(torch.outer(c1[i], c1[i]) for i in range(b)) / (b - 1) + ridge * torch.eye(h1.shape[1], dtype=h1.dtype)
    s22 = sum(torch.outer(c2[i], c2[i]) for i in range(b)) / (b - 1) + ridge * torch.eye(h2.shape[1], dtype=h1.dtype)
    s12 = sum(torch.outer(c1[i], c2[i]) for i in range(b)) / (b - 1)

    def inv_sqrt(s):
        val, vec = torch.linalg.eigh(s)
        return vec @ torch.diag(val**-0.5) @ vec.T

    rho = torch.linalg.svdvals(inv_sqrt(s11) @ s12 @ inv_sqrt(s22))
    k = min(h1.shape[1], h2.shape[1])
    return 1 - (rho[:k] ** 2).mean(), rho[:k]


@pytest.mark.parametrize("b,e1,e2", [(9, 3, 3), (13, 4, 2), (31, 5, 6)])
def test_dcca_matches_reference_forward_and_gradient(b, e1, e2):
    g = torch.Generator().manual_seed(b)
    h1 = torch.randn(b, e1, generator=g, dtype=torch.float64)
    h2 = h1[:, :1].repeat(1, e2) * 0.7 + torch.randn(b, e2, generator=g, dtype=torch.float64)
    got, got_grads = _grads(lambda a, c: losses.dcca_loss(a, c, 1e-3)[0], h1, h2)
    want, want_grads = _grads(lambda a, c: _dcca_reference(a, c, 1e-3)[0], h1, h2)
    torch.testing.assert_close(got, want)
    for gg, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(gg, wg, rtol=1e-6, atol=1e-9)
    _, diag = losses.dcca_loss(h1, h2, 1e-3)
    np.testing.assert_allclose(diag["correlations"].numpy(), _dcca_reference(h1, h2, 1e-3)[1].numpy(), rtol=1e-5)


def test_dcca_is_non_negative_and_small_for_identical_views():
    h = torch.randn(50, 4, dtype=torch.float32)
    same, _ = losses.dcca_loss(h, h.clone(), 1e-4)
    unrelated, _ = losses.dcca_loss(h, torch.randn(50, 4), 1e-4)
    assert 0.0 <= float(same) < 1e-3 and float(same) < float(unrelated) <= 1.0
    assert same.dtype == torch.float32  # computed in float64, returned in the input dtype


def test_dcca_refuses_a_single_row():
    with pytest.raises(ValueError, match="≥2"):
        losses.dcca_loss(torch.randn(1, 3), torch.randn(1, 3))


# --- teacher-mined soft top-k InfoNCE ---------------------------------------------------------------
def _weights_reference(t_a, t_v, k, tau_w):
    b = t_a.shape[0]
    zbar = [(t_a[i] + t_v[i]) / 2 for i in range(b)]
    zbar = [z / z.norm() for z in zbar]
    w = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        cands = sorted(((float(zbar[i] @ zbar[j]), j) for j in range(b) if j != i and float(zbar[i] @ zbar[j]) > 0), reverse=True)[:k]
        if cands:
            denom = sum(math.exp(s / tau_w) for s, _ in cands)
            for s, j in cands:
                w[i, j] = math.exp(s / tau_w) / denom
    return w


def _soft_nce_reference(z_q, z_k, w, tau, beta):
    """Direct P_i / N_i sums of spec §4.3 in a loop; rows without a positive are skipped."""
    b = z_q.shape[0]
    rows = []
    for i in range(b):
        pos = (beta or 0.0) * torch.exp(z_q[i] @ z_k[i] / tau)
        neg = z_q.new_zeros(())
        for j in range(b):
            if j == i:
                continue
            e = torch.exp(z_q[i] @ z_k[j] / tau)
            pos = pos + w[i, j] * e
            neg = neg + (1 - w[i, j]) * e
        if float(w[i].sum()) > 0 or (beta or 0.0) > 0:
            rows.append(-torch.log(pos / (pos + neg)))
    return torch.stack(rows).mean() if rows else z_q.sum() * 0


def _teacher_with_isolated_rows(b: int, e: int = 4):
    """Teacher embeddings where rows 1 and 3 have no positive-similarity neighbour."""
    t = _unit(b, e, 7).abs()
    t[:, 3] = 0.0  # the others live in the positive orthant of dims 0-2: every pair among them has S > 0
    t[1] = -1.0  # opposite to all of them (and to row 3)
    t[3] = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # orthogonal to them: S = 0 is not a neighbour
    return F.normalize(t, dim=1)


@pytest.mark.parametrize("b", [5, 9, 16])
@pytest.mark.parametrize("beta", [None, 0.5, 1.0])
def test_soft_topk_infonce_matches_loop(b, beta):
    z_a, z_v = _unit(b, 4, 1), _unit(b, 4, 2)
    teacher = _teacher_with_isolated_rows(b)
    w, has = losses.teacher_neighbour_weights(teacher, teacher, k=3, tau_w=0.05)
    w_ref = _weights_reference(teacher, teacher, 3, 0.05)
    torch.testing.assert_close(w, w_ref)
    assert not has[1] and not has[3] and has[0]
    got, got_grads = _grads(lambda a, v: losses.soft_topk_infonce(a, v, w, has, 0.1, beta)[0].double(), z_a, z_v)
    want, want_grads = _grads(lambda a, v: _soft_nce_reference(a, v, w_ref, 0.1, beta), z_a, z_v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for gg, wg in zip(got_grads, want_grads):
        assert torch.all(torch.isfinite(gg))
        torch.testing.assert_close(gg, wg, rtol=1e-4, atol=1e-6)


def test_soft_topk_rows_without_neighbour_are_left_out_or_use_the_pair():
    b = 7
    teacher = _teacher_with_isolated_rows(b)
    w, has = losses.teacher_neighbour_weights(teacher, teacher, k=2, tau_w=0.05)
    _, diag_ref = losses.soft_topk_infonce(_unit(b, 4, 1), _unit(b, 4, 2), w, has, 0.1, None)
    _, diag_pair = losses.soft_topk_infonce(_unit(b, 4, 1), _unit(b, 4, 2), w, has, 0.1, 1.0)
    assert float(diag_ref["rows_used"]) == pytest.approx(5 / 7)
    assert float(diag_pair["rows_used"]) == 1.0


def test_soft_topk_with_no_valid_row_is_zero_not_nan():
    z = _unit(3, 2, 0).requires_grad_(True)
    w, has = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
    loss, _ = losses.soft_topk_infonce(z, z, w, has, 0.1, None)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(torch.isfinite(z.grad))


def test_neighbour_weights_rows_sum_to_one_and_keep_k():
    t = _unit(11, 6, 3).abs()
    w, has = losses.teacher_neighbour_weights(t, t, k=4, tau_w=0.1)
    assert has.all()
    torch.testing.assert_close(w.sum(1), torch.ones(11, dtype=torch.float64))
    assert torch.all((w > 0).sum(1) == 4) and torch.all(w.diagonal() == 0)
    w_big, _ = losses.teacher_neighbour_weights(t, t, k=50, tau_w=0.1)  # k ≥ B−1 keeps every other row
    assert torch.all((w_big > 0).sum(1) == 10)


def test_symmetric_soft_topk_averages_both_directions():
    b = 9
    z_a, z_v, t = _unit(b, 4, 1), _unit(b, 4, 2), _unit(b, 4, 3)
    w, has = losses.teacher_neighbour_weights(t, t, 3, 0.05)
    a2v, _ = losses.soft_topk_infonce(z_a, z_v, w, has, 0.05, None)
    v2a, _ = losses.soft_topk_infonce(z_v, z_a, w, has, 0.05, None)
    both, _ = losses.symmetric_soft_topk_infonce(z_a, z_v, t, t, 3, 0.05, 0.05, None)
    torch.testing.assert_close(both, (a2v + v2a) / 2)


# --- paired InfoNCE, distillation, weighting --------------------------------------------------------
def _paired_reference(z_a, z_v, tau):
    b = z_a.shape[0]
    total = z_a.new_zeros(())
    for i in range(b):
        row = torch.stack([z_a[i] @ z_v[j] / tau for j in range(b)])
        col = torch.stack([z_v[i] @ z_a[j] / tau for j in range(b)])
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * b)


@pytest.mark.parametrize("b", [3, 8, 17])
def test_paired_infonce_matches_loop(b):
    z_a, z_v = _unit(b, 5, 1), _unit(b, 5, 2)
    got, got_grads = _grads(lambda a, v: losses.paired_infonce(a, v, 0.07).double(), z_a, z_v)
    want, want_grads = _grads(lambda a, v: _paired_reference(a, v, 0.07), z_a, z_v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for gg, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(gg, wg, rtol=1e-4, atol=1e-6)


def test_distillation_matches_loop_and_never_reaches_the_teacher():
    z_s, z_t = _unit(5, 3, 1), _unit(5, 3, 2).requires_grad_(True)
    got, (grad,) = _grads(lambda s: losses.distillation_loss(s, z_t), z_s)
    want, (want_grad,) = _grads(lambda s: sum(((s[i] - z_t[i].detach()) ** 2).sum() for i in range(5)) / 5, z_s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert z_t.grad is None


def test_uncertainty_weighting_formula_and_gradient():
    terms = {"a": torch.tensor(2.0, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    log_vars = {"a": torch.tensor(0.3, requires_grad=True), "b": torch.tensor(-1.0, requires_grad=True)}
    total, weights = losses.uncertainty_weighted_sum(terms, log_vars)
    assert float(total) == pytest.approx(math.exp(-0.3) * 2 + 0.3 + math.exp(1.0) * 0.5 - 1.0)
    assert weights == pytest.approx({"a": math.exp(-0.3), "b": math.exp(1.0)})
    total.backward()
    assert float(log_vars["a"].grad) == pytest.approx(1 - math.exp(-0.3) * 2)  # ∂/∂s = 1 − e^{−s}L
    assert float(terms["b"].grad) == pytest.approx(math.exp(1.0))
    fixed = losses.fixed_weighted_sum({"a": torch.tensor(2.0), "b": torch.tensor(0.5)}, {"b": 0.25})
    assert float(fixed) == pytest.approx(2.0 + 0.125)
