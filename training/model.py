"""Per-modality towers: feature scaling → encoder → projection head → L2-normalised embedding.

One tower per modality is the single contract every stage runs (training, evaluation, export,
indexing): ``tower(x: (B, D_in)) -> (B, E)``. The feature scaling (train-split mean and std) lives
inside the tower as buffers, so an exported encoder cannot drift from the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("audio", "visual")


@dataclass
class ModelConfig:
    hidden_dim: int = 1024  # width of every encoder layer (spec §2: 1024)
    depth: int = 3  # linear layers per encoder
    out_dim: int = 32  # embedding width E of the projection head
    dropout: float = 0.2  # dropout after each hidden layer


class Encoder(nn.Module):
    """BatchNorm on the input, then (Linear-LayerNorm-Tanh-Dropout)×(depth−1), Linear-LayerNorm.

    (B, D_in) -> (B, hidden_dim)
    """

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(d_in)]
        width = d_in
        for _ in range(cfg.depth - 1):
            layers += [nn.Linear(width, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim), nn.Tanh(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden_dim
        layers += [nn.Linear(width, cfg.hidden_dim), nn.LayerNorm(cfg.hidden_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tower(nn.Module):
    """Scaling, encoder and projection head of one modality."""

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_std", torch.ones(d_in))
        self.encoder = Encoder(d_in, cfg)
        self.head = nn.Linear(cfg.hidden_dim, cfg.out_dim)

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Feature statistics of the training split (never val or test)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=1e-6))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_in) raw features -> (B, hidden_dim) hidden representation h."""
        return self.encoder((x - self.feature_mean) / self.feature_std)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(B, hidden_dim) -> (B, E) unit-norm embedding z."""
        return F.normalize(self.head(h), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode(x))


class AVModel(nn.Module):
    """The audio and the visual tower, with separate weights."""

    def __init__(self, audio_dim: int, visual_dim: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict({"audio": Tower(audio_dim, cfg), "visual": Tower(visual_dim, cfg)})

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self.towers[modality](x)
