"""HSC-MAE's modules: per-modality towers, cross-attention fusion, decoders, value masking (spec §2).

One tower per modality is the single contract every stage runs (training, evaluation, export,
indexing): ``tower(x: (B, D_in)) -> (B, E)``. The feature scaling (train-split mean and std) lives
inside the tower as buffers, so an exported encoder cannot drift from the trained one. The fusion
block and the decoders need both modalities and exist only for training: they are never part of
the exported per-modality path (``model.towers[modality]``).

Vocabulary: ``B`` batch, ``D_a``/``D_v`` input widths, ``H`` hidden width, ``E`` embedding width,
``L`` fusion tokens per clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("audio", "visual")
DECODERS = ("audio", "visual", "audio2visual", "visual2audio")  # source→target; "audio" = audio→audio


@dataclass
class ModelConfig:
    hidden_dim: int = 1024  # H: width of every encoder layer (spec §2: 1024)
    depth: int = 3  # linear layers per encoder
    out_dim: int = 32  # E: embedding width of the projection head
    head: bool = True  # a learned projection H -> E; False: z = normalise(h), E = H (for objectives that train no head)
    dropout: float = 0.2  # dropout after each hidden encoder layer
    fusion_tokens: int = 8  # L: h is split into L tokens of H/L for cross-attention
    fusion_heads: int = 1  # attention heads per fusion direction (must divide H/L)
    decoder_hidden: int = 1024  # hidden width of the 3-layer decoders (spec §2: 1024)
    decoder_depth: int = 3  # linear layers per decoder

    @property
    def embedding_dim(self) -> int:
        """E: the width of z, what the tower returns."""
        return self.out_dim if self.head else self.hidden_dim


class Encoder(nn.Module):
    """BatchNorm on the input, then (Linear-LayerNorm-Tanh-Dropout)×(depth−1), Linear-LayerNorm.

    (B, D_in) -> (B, H)
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
    """Scaling, encoder and projection head of one modality: the exported retrieval path."""

    def __init__(self, d_in: int, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(d_in))
        self.register_buffer("feature_std", torch.ones(d_in))
        self.encoder = Encoder(d_in, cfg)
        # Nothing trains a head under a reconstruction-only objective; a random projection of h would
        # only lose information before the test-time CCA, so such models use h itself.
        self.head = nn.Linear(cfg.hidden_dim, cfg.out_dim) if cfg.head else nn.Identity()

    def set_scaling(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Feature statistics of the training split (never val or test)."""
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=1e-6))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_in) raw -> (B, D_in) standardised features (the space masks and decoders work in)."""
        return (x - self.feature_mean) / self.feature_std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_in) raw features -> (B, H) hidden representation h."""
        return self.encoder(self.scale(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """(B, H) -> (B, E) unit-norm embedding z."""
        return F.normalize(self.head(h), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode(x))


class CrossAttentionFusion(nn.Module):
    """Each modality's L tokens attend to the other modality's L tokens (pre-norm, residual).

    h_a, h_v (B, H) are reshaped to (B, L, H/L); audio queries attend over visual keys/values and
    the reverse, so with L > 1 the attention has L keys to choose from (the reference's length-1
    sequence degenerates to a linear map). Returns fused (B, H) representations f_a, f_v.
    """

    def __init__(self, hidden_dim: int, tokens: int, heads: int):
        super().__init__()
        if hidden_dim % tokens:
            raise ValueError(f"fusion_tokens={tokens} must divide hidden_dim={hidden_dim}")
        self.tokens, self.token_dim = tokens, hidden_dim // tokens
        self.norm_q = nn.ModuleDict({m: nn.LayerNorm(self.token_dim) for m in MODALITIES})
        self.attend = nn.ModuleDict({m: nn.MultiheadAttention(self.token_dim, heads, batch_first=True) for m in MODALITIES})
        self.position = nn.Parameter(torch.zeros(tokens, self.token_dim))  # tokens are ordered slices of h

    def forward(self, h_a: torch.Tensor, h_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = h_a.shape[0]
        t = {"audio": h_a.reshape(b, self.tokens, self.token_dim) + self.position, "visual": h_v.reshape(b, self.tokens, self.token_dim) + self.position}
        fused = {}
        for query, other in (("audio", "visual"), ("visual", "audio")):
            q = self.norm_q[query](t[query])
            kv = self.norm_q[other](t[other])
            mixed, _ = self.attend[query](q, kv, kv, need_weights=False)  # (B, L, H/L)
            fused[query] = (t[query] + mixed).reshape(b, -1)
        return fused["audio"], fused["visual"]


class Decoder(nn.Module):
    """(Linear-LayerNorm-GELU)×(depth−1), Linear: (B, H) -> (B, D_out) standardised features."""

    def __init__(self, d_in: int, d_out: int, hidden: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class MAEOutputs:
    """Student MAE path on masked inputs (all in float32)."""

    h: dict[str, torch.Tensor]  # modality -> (B, H) encoder output of the masked input
    z: dict[str, torch.Tensor]  # modality -> (B, E) unit-norm embedding z^mae
    recon: dict[str, torch.Tensor]  # decoder name (DECODERS) -> (B, D_target) standardised prediction


class AVModel(nn.Module):
    """The two towers (exported), plus the training-only fusion block and decoders."""

    def __init__(self, audio_dim: int, visual_dim: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.towers = nn.ModuleDict({"audio": Tower(audio_dim, cfg), "visual": Tower(visual_dim, cfg)})
        self.fusion = CrossAttentionFusion(cfg.hidden_dim, cfg.fusion_tokens, cfg.fusion_heads)
        dims = {"audio": audio_dim, "visual": visual_dim}
        targets = {"audio": "audio", "visual": "visual", "audio2visual": "visual", "visual2audio": "audio"}
        self.decoders = nn.ModuleDict(
            {name: Decoder(cfg.hidden_dim, dims[targets[name]], cfg.decoder_hidden, cfg.decoder_depth) for name in DECODERS}
        )

    def embed(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """(B, D_in) raw features -> (B, E): the retrieval path, one modality only."""
        return self.towers[modality](x)

    def forward_mae(self, xs_a: torch.Tensor, xs_v: torch.Tensor, fuse: bool = True) -> MAEOutputs:
        """Masked *standardised* inputs (B, D_a), (B, D_v) -> hidden, embeddings, reconstructions.

        The intra-modal decoders read the fused representation (each modality's tokens after
        attending to the other's), so fusion helps fill in masked values from the partner clip.
        The cross-modal decoders read the unfused h: predicting x_v from audio alone is what makes
        the audio encoder carry visual information at serving time, when only one modality exists.
        """
        h = {"audio": self.towers["audio"].encoder(xs_a), "visual": self.towers["visual"].encoder(xs_v)}
        z = {m: self.towers[m].project(h[m]) for m in MODALITIES}
        f_a, f_v = self.fusion(h["audio"], h["visual"]) if fuse else (h["audio"], h["visual"])
        recon = {
            "audio": self.decoders["audio"](f_a),
            "visual": self.decoders["visual"](f_v),
            "audio2visual": self.decoders["audio2visual"](h["audio"]),
            "visual2audio": self.decoders["visual2audio"](h["visual"]),
        }
        return MAEOutputs(h=h, z=z, recon=recon)


def value_mask(x: torch.Tensor, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-level value masking: zero each value of each row independently with probability ρ.

    x (B, D) standardised, so a zero stands for the training mean. Returns (masked x, mask) with
    mask (B, D) bool, True where a value was hidden. ``generator`` lives on the CPU so results are
    identical on every device.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    mask = (torch.rand(x.shape, generator=generator) < ratio).to(x.device)
    return x.masked_fill(mask, 0.0), mask
