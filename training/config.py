"""Typed configuration, loaded from YAML presets in ``training/configs/`` (``tiny``, ``default``, ``paper``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from training.cca import CCAConfig
from training.hscmae import ObjectiveConfig
from training.model import ModelConfig
from training.synthetic import SyntheticConfig

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    """The budget is counted in optimiser steps, so one recipe fits 10^3 to 10^6 clips.

    Fixed here: the step budget, the largest batch, the patience. Derived from the training
    split's size N by :func:`training.train.plan_schedule`: the batch (capped so an epoch has at
    least ``min_batches_per_epoch`` steps), steps per epoch, and how often validation runs.
    """

    max_steps: int = 3000  # optimiser-step budget; early stopping usually ends sooner
    batch_size: int = 256  # largest batch: paired clips per step
    min_batches_per_epoch: int = 8  # caps the batch at N // 8 on small training splits
    eval_every: int = 0  # steps between validation evaluations; 0 = one epoch, kept within 25..100 steps
    patience: int = 800  # stop after this many steps without progress on validation mAP; 0 = never
    min_delta: float = 0.002  # progress = validation avg mAP above the last progress point by more than this
    min_steps: int = 0  # never stop early before this step (0 = after the warm-up)
    select: str = "auto"  # the validation signal that selects the step and stops training: pairs, labels or auto (training.train.selection_signal)
    select_rows: int = 4000  # rows of train (CCA fit) and val (mAP) used for selection; larger splits are sampled
    lr: float = 3e-4  # AdamW peak learning rate (cosine schedule over max_steps)
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # max global grad norm
    seed: int = 42  # model init, batch order and masking
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    threads: int = 0  # torch intra-op threads; 0 = torch's default. 1 is far faster on a busy shared CPU
    amp: bool = False  # bfloat16 autocast for the encoders/decoders (DCCA stays float64)
    method: str = "hscmae"  # a name from training.baselines.METHODS (recorded; overrides already applied)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # loss terms and switches
    cca: CCAConfig = field(default_factory=CCAConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # used when DATA is "synthetic"


def _build(cls, values: dict):
    """Nested dataclass from a dict; unknown keys are an error, not silently ignored."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    renamed = {"epochs": "train.max_steps", "warmup_epochs": "objective.warmup_steps"}.items()
    for old, new in renamed:
        if old in values:
            raise ValueError(f"{cls.__name__}: {old!r} was replaced by {new!r} (budgets are counted in optimiser steps)")
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        field_type = known[name].type
        sub = {c.__name__: c for c in (ModelConfig, TrainConfig, ObjectiveConfig, CCAConfig, SyntheticConfig)}
        if isinstance(value, dict) and isinstance(field_type, str) and field_type in sub:
            value = _build(sub[field_type], value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)


def load_config(preset_or_path: str) -> Config:
    """A preset name (``tiny``, ``default``, ``paper``) or a path to a YAML file."""
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{preset_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"config {preset_or_path!r} not found; presets: {presets}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, train, ...), got {type(values).__name__}")
    return config_from_dict(values)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
