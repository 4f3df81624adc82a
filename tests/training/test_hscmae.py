"""The model and the dual path: masking, fusion, EMA teacher, warm-up, what reaches the teacher."""

from __future__ import annotations

import copy

import pytest
import torch

from training.config import load_config
from training.hscmae import ObjectiveConfig, TaskWeights, active_terms, ema_update, hscmae_step, momentum_at
from training.model import AVModel, CrossAttentionFusion, ModelConfig, value_mask

SMALL = ModelConfig(hidden_dim=16, depth=2, out_dim=4, dropout=0.0, fusion_tokens=4, decoder_hidden=8)


def _batch(b=9, d_a=6, d_v=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_a, generator=g), torch.randn(b, d_v, generator=g)


def test_value_mask_is_seedable_and_has_the_ratio():
    x = torch.randn(200, 50)
    a, mask_a = value_mask(x, 0.3, torch.Generator().manual_seed(1))
    b, mask_b = value_mask(x, 0.3, torch.Generator().manual_seed(1))
    _, mask_c = value_mask(x, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b) and not torch.equal(mask_a, mask_c)
    assert abs(mask_a.float().mean().item() - 0.3) < 0.02
    assert torch.all(a[mask_a] == 0) and torch.equal(a[~mask_a], x[~mask_a])
    unchanged, none = value_mask(x, 0.0, torch.Generator())
    assert torch.equal(unchanged, x) and not none.any()
    with pytest.raises(ValueError, match="mask ratio"):
        value_mask(x, 1.0, torch.Generator())


def test_fusion_really_mixes_the_modalities():
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(hidden_dim=16, tokens=4, heads=2)
    h_a, h_v = torch.randn(3, 16), torch.randn(3, 16)
    f_a, f_v = fusion(h_a, h_v)
    assert f_a.shape == f_v.shape == (3, 16)
    f_a2, _ = fusion(h_a, h_v + torch.randn(3, 16))  # change only the visual side ...
    assert not torch.allclose(f_a, f_a2, atol=1e-4)  # ... and the fused audio changes
    with pytest.raises(ValueError, match="divide"):
        CrossAttentionFusion(hidden_dim=10, tokens=4, heads=1)


def test_retrieval_tower_never_uses_fusion_or_decoders():
    torch.manual_seed(0)
    model = AVModel(6, 10, SMALL).eval()
    x_a, _ = _batch()
    before = model.embed("audio", x_a)
    with torch.no_grad():  # scrambling everything outside the tower changes nothing served
        for p in list(model.fusion.parameters()) + list(model.decoders.parameters()) + list(model.towers["visual"].parameters()):
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(model.embed("audio", x_a), before)
    torch.testing.assert_close(before.norm(dim=1), torch.ones(len(x_a)))


def _setup(obj: ObjectiveConfig):
    torch.manual_seed(0)
    student = AVModel(6, 10, SMALL)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    return student, teacher, TaskWeights(active_terms(obj))


def test_no_gradient_reaches_the_teacher():
    obj = ObjectiveConfig(warmup_steps=0, k=3, distill=True, learned_weights=True)  # every term, learned weights
    student, teacher, weights = _setup(obj)
    x_a, x_v = _batch()
    teacher_before = copy.deepcopy(teacher.state_dict())
    out = hscmae_step(student, teacher, weights, obj, x_a, x_v, torch.Generator().manual_seed(0), step=3)
    assert set(out.terms) == {"recon_intra", "recon_cross", "dcca", "soft_nce", "distill"}
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in weights.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_ema_update_and_momentum_schedule():
    student, teacher, _ = _setup(ObjectiveConfig())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    pairs = [(copy.deepcopy(pt), ps.detach().clone()) for pt, ps in zip(teacher.parameters(), student.parameters())]
    ema_update(teacher, student, 0.9)
    for (old, new), pt in zip(pairs, teacher.parameters()):
        torch.testing.assert_close(pt, 0.9 * old + 0.1 * new)
    assert momentum_at(0, 100, 0.95, 0.999) == pytest.approx(0.95)
    assert momentum_at(99, 100, 0.95, 0.999) == pytest.approx(0.999)
    assert 0.95 < momentum_at(50, 100, 0.95, 0.999) < 0.999


def test_warm_up_has_no_dcca_ramps_the_cross_term_then_learns_weights():
    obj = ObjectiveConfig(warmup_steps=4, k=3, learned_weights=True)
    student, teacher, weights = _setup(obj)
    x_a, x_v = _batch()
    warm = hscmae_step(student, teacher, weights, obj, x_a, x_v, torch.Generator().manual_seed(0), step=1)
    assert "dcca" not in warm.terms and warm.weights["recon_cross"] == pytest.approx(0.25)
    with torch.no_grad():
        weights.log_vars["soft_nce"].fill_(1.0)
    after = hscmae_step(student, teacher, weights, obj, x_a, x_v, torch.Generator().manual_seed(0), step=4)
    assert "dcca" in after.terms and after.weights["soft_nce"] == pytest.approx(torch.exp(torch.tensor(-1.0)).item())
    weights.clamp_(-2.0, 0.5)
    assert float(weights.log_vars["soft_nce"].detach()) == 0.5


def test_masked_pass_leaves_batchnorm_running_statistics_alone():
    obj = ObjectiveConfig(dcca=False, warmup_steps=0, k=3)  # only the masked MAE path runs
    student, teacher, weights = _setup(obj)
    student.train()
    x_a, x_v = _batch()
    before = student.towers["audio"].encoder.net[0].running_mean.clone()
    hscmae_step(student, teacher, weights, obj, x_a * 5 + 3, x_v, torch.Generator().manual_seed(0), step=1)
    torch.testing.assert_close(student.towers["audio"].encoder.net[0].running_mean, before)
    assert student.towers["audio"].encoder.net[0].momentum == 0.1  # restored


def test_objective_refuses_impossible_combinations():
    with pytest.raises(ValueError, match="teacher"):
        active_terms(ObjectiveConfig(teacher=False))
    with pytest.raises(ValueError, match="switched off"):
        active_terms(ObjectiveConfig(recon_intra=False, recon_cross=False, dcca=False, soft_nce=False, distill=False))


def test_presets_load_with_typed_sections():
    for name in ("tiny", "default", "paper"):
        cfg = load_config(name)
        assert isinstance(cfg.objective, ObjectiveConfig) and cfg.model.hidden_dim % cfg.model.fusion_tokens == 0
    paper = load_config("paper")
    assert (paper.model.hidden_dim, paper.train.batch_size, paper.model.out_dim, paper.cca.n_components) == (1024, 512, 32, 10)
    with pytest.raises(ValueError, match="unknown ObjectiveConfig keys"):
        from training.config import config_from_dict

        config_from_dict({"objective": {"no_such_switch": True}})


def test_exported_graph_holds_only_the_tower_path(tiny):
    """No attention (fusion) and no decoder in the served ONNX graph: depth Gemms + head + CCA."""
    import onnx

    cfg = load_config("tiny")
    for modality in ("audio", "visual"):
        graph = onnx.load(str(tiny.model_dir / f"{modality}_encoder.onnx")).graph
        ops = [n.op_type for n in graph.node]
        assert not {"Softmax", "Attention", "MultiHeadAttention", "Gelu", "Erf"} & set(ops)
        assert ops.count("Gemm") + ops.count("MatMul") == cfg.model.depth + 1 + 1  # encoder, head, CCA
