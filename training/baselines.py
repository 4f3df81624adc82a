"""Baselines, ablations and the mask-ratio sweep, as named overrides of the HSC-MAE objective.

Every method trains with the same loop, data, splits, selection (validation mAP) and test-time
linear CCA as HSC-MAE; only ``cfg.objective`` differs. ``linear-cca`` has no encoder at all: CCA
fitted on the raw (standardised) training features.
"""

from __future__ import annotations

import copy

import numpy as np

from training.cca import fit_linear_cca
from training.config import Config
from training.data import PairedFeatures, dequantized
from training.metrics import retrieval_metrics

_NO_HSC = {"dcca": False, "soft_nce": False, "distill": False, "recon_intra": False, "recon_cross": False}

# name -> (group, description, objective overrides)
METHODS: dict[str, tuple[str, str, dict]] = {
    "hscmae": ("method", "HSC-MAE (full)", {}),
    "linear-cca": ("baseline", "linear CCA on raw features", {}),
    "dcca": ("baseline", "DCCA (encoders + DCCA only)", {**_NO_HSC, "dcca": True, "teacher": False, "mask_ratio": 0.0}),
    "mae": ("baseline", "MAE only (+ linear CCA on h)", {**_NO_HSC, "recon_intra": True, "teacher": False, "fusion": False, "model.head": False}),
    "clip": ("baseline", "paired InfoNCE (CLIP-style)", {**_NO_HSC, "paired_nce": True, "teacher": False, "mask_ratio": 0.0}),
    "cavmae": ("baseline", "MAE + paired InfoNCE (CAV-MAE-style)", {**_NO_HSC, "recon_intra": True, "paired_nce": True, "paired_nce_masked": True, "teacher": False}),
    "no-dcca": ("ablation", "HSC-MAE without DCCA", {"dcca": False}),
    "no-softnce": ("ablation", "HSC-MAE without soft top-k InfoNCE", {"soft_nce": False}),
    "no-recon": ("ablation", "HSC-MAE without reconstruction", {"recon_intra": False, "recon_cross": False}),
    "distill": ("ablation", "HSC-MAE with distillation (spec: optional)", {"distill": True}),
    "fixed-weights": ("ablation", "HSC-MAE with fixed task weights (all 1)", {"learned_weights": False}),
}
# Search spaces for `python -m training tune`, per method: "section.field" -> (kind, low, high),
# kind "log" (log-uniform float), "float" or "int". Every method tunes its optimiser, dropout and
# test-time CCA ridge; each then tunes the knobs of its own objective, and nothing else.
_COMMON_SPACE = {
    "train.lr": ("log", 1e-4, 3e-3),
    "train.weight_decay": ("log", 1e-6, 1e-2),
    "model.dropout": ("float", 0.0, 0.5),
    "cca.ridge": ("log", 1e-3, 1.0),
}
_TAU = {"objective.tau": ("log", 0.03, 0.5)}
_MASK = {"objective.mask_ratio": ("float", 0.05, 0.75)}
_HSCMAE_SPACE = {**_COMMON_SPACE, **_TAU, **_MASK, "objective.tau_w": ("log", 0.01, 0.3), "objective.k": ("int", 2, 12)}
SEARCH_SPACES: dict[str, dict[str, tuple]] = {
    "hscmae": _HSCMAE_SPACE,
    "dcca": {**_COMMON_SPACE, "objective.dcca_ridge": ("log", 1e-5, 1e-1)},
    "mae": {**_COMMON_SPACE, **_MASK},
    "clip": {**_COMMON_SPACE, **_TAU},
    "cavmae": {**_COMMON_SPACE, **_TAU, **_MASK},
}


def search_space(name: str) -> dict[str, tuple]:
    """The declared space of ``name``; ablations and sweep points tune as the full model does."""
    if name not in METHODS or name == "linear-cca":
        raise ValueError(f"method {name!r} has no search space; choose from {sorted(m for m in METHODS if m != 'linear-cca')}")
    space = dict(SEARCH_SPACES.get(name, _HSCMAE_SPACE))
    for key in METHODS[name][2]:  # a knob the method fixes (e.g. a sweep's ρ) is not searched
        space.pop(key if "." in key else f"objective.{key}", None)
    return space


SWEEP_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75)
for _rho in SWEEP_RATIOS:
    METHODS[f"rho={_rho:g}"] = ("sweep", f"HSC-MAE, mask ratio ρ = {_rho:g}", {"mask_ratio": _rho})


def method_config(cfg: Config, name: str) -> Config:
    """A copy of ``cfg`` with the objective overrides of method ``name`` applied."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    out = copy.deepcopy(cfg)
    for key, value in METHODS[name][2].items():
        section, field = key.split(".") if "." in key else ("objective", key)  # bare keys are objective switches
        setattr(getattr(out, section), field, value)
    out.train.method = name
    return out


def linear_cca_on_raw(data: PairedFeatures, cfg: Config) -> dict:
    """The linear-CCA baseline: standardise with train statistics, fit on train, select nothing.

    Returns {"val": metrics, "test": metrics} (no training, so no epoch to select).
    """
    train = data.subset("train")
    stats = {m: (dequantized(getattr(train, m)).mean(0), dequantized(getattr(train, m)).std(0).clip(1e-6)) for m in ("audio", "visual")}

    def scaled(split: PairedFeatures, m: str) -> np.ndarray:
        return (dequantized(getattr(split, m)) - stats[m][0]) / stats[m][1]

    cca = fit_linear_cca(scaled(train, "audio"), scaled(train, "visual"), cfg.cca.n_components, cfg.cca.ridge)
    out = {}
    for name in ("val", "test"):
        split = data.subset(name)
        out[name] = retrieval_metrics(cca.transform(scaled(split, "audio"), "a"), cca.transform(scaled(split, "visual"), "b"), split.labels)
    return out
