"""The embedded default: a seeded generator of AVE/VEGAS-like paired clip features.

Each clip is a short video summarised, like AVE/VEGAS, by one averaged audio vector (VGGish-like,
128-d) and one averaged visual vector (Inception-like, 1024-d). The generator models what makes
real clips hard to align without labels:

* **events and classes**: C event classes, each a prototype in a small semantic latent space;
  every event *instance* deviates from its prototype (a particular dog, a particular engine), and
  that deviation is shared by the sound and the picture of the same instance;
* **multi-event clips**: a primary event (the evaluation label) plus 0..``max_secondary``
  secondary events of lower weight, averaged into the clip like frame features averaged over time;
* **spurious co-occurrences**: a secondary event may be heard but not seen (off-screen source)
  or seen but not heard (a silent object); occasionally the primary event itself is missing from
  one modality;
* **modality-private nuisance**: recording conditions (microphone, camera, scene) that vary per
  clip, are strong, and are independent across the two modalities;
* **different nonlinear maps**: each modality observes its latent through its own random
  two-layer tanh network (visual features are rectified, like pooled CNN activations), plus noise;
* **8-bit quantisation** (optional) like YouTube-8M features: scaled into [−2, 2] and coded by
  YouTube-8M's rule (:class:`avdata.paired.Quantization`), de-quantised by the loader the same way.

The combination keeps linear CCA on raw features far from perfect (see ``tests/training``), so
method differences show. Labels are the primary event's class; they are for evaluation only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from avdata.paired import SPLIT_NAMES, YOUTUBE8M, PairedFeatures, dequantize

__all__ = ["SyntheticConfig", "World", "make_world", "draw_clips", "generate", "generate_chunks"]


@dataclass
class SyntheticConfig:
    n_clips: int = 6000  # clips in total, over all splits
    n_classes: int = 10  # event classes C (AVE has 28, VEGAS 10)
    audio_dim: int = 128  # D_a, VGGish width
    visual_dim: int = 1024  # D_v, Inception-v3 pooled width
    latent_dim: int = 16  # width of the semantic latent space of events
    hidden_dim: int = 256  # width of the random nonlinear observation maps
    instance_std: float = 1.0  # how far an event instance strays from its class prototype
    max_secondary: int = 2  # secondary events per clip: uniform in 0..max_secondary
    secondary_weight: tuple[float, float] = (0.3, 0.8)  # weight range of a secondary event
    p_offscreen: float = 0.3  # a secondary event is heard but not seen
    p_silent: float = 0.3  # a secondary event is seen but not heard
    p_primary_missing: float = 0.08  # the primary event is absent from one of the modalities
    nuisance_dim: int = 8  # modality-private recording-condition factors
    nuisance_std: float = 1.0  # their strength, relative to unit-norm-ish event latents
    map_gain: float = 3.0  # gain of the first layer: higher = more saturated, less linear
    noise_std: float = 0.2  # observation noise, relative to the feature scale
    quantize: bool = False  # emit uint8 features as YouTube-8M does
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train, val, test
    seed: int = 0  # everything above is a deterministic function of this seed
    extra: dict = field(default_factory=dict)  # free-form notes carried into the data card


def _observation_map(rng: np.random.Generator, d_in: int, d_hidden: int, d_out: int, gain: float):
    """A random two-layer tanh network, returned as its weight matrices."""
    w1 = rng.standard_normal((d_in, d_hidden)) * gain / np.sqrt(d_in)
    b1 = rng.standard_normal(d_hidden) * 0.5
    w2 = rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)
    return w1, b1, w2


def _apply_map(u: np.ndarray, weights) -> np.ndarray:
    w1, b1, w2 = weights
    return np.tanh(u @ w1 + b1) @ w2


def _quantize(x: np.ndarray) -> np.ndarray:
    # Scale into YouTube-8M's range [-2, 2] (99.9th percentile at 1.9), then its 8-bit code.
    scale = 1.9 / max(np.percentile(np.abs(x), 99.9), 1e-12)
    return YOUTUBE8M.quantize(x * scale)


@dataclass
class World:
    """What stays fixed across every clip drawn from one seed: class prototypes, observation maps."""

    prototypes: np.ndarray  # (C, latent_dim)
    audio_map: tuple
    visual_map: tuple


def make_world(cfg: SyntheticConfig, rng: np.random.Generator | None = None) -> World:
    """The seed's world; ``rng`` continues to draw the clips when given (as ``generate`` does)."""
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    k = cfg.latent_dim
    prototypes = rng.standard_normal((cfg.n_classes, k))
    audio_map = _observation_map(rng, k + cfg.nuisance_dim, cfg.hidden_dim, cfg.audio_dim, cfg.map_gain)
    visual_map = _observation_map(rng, k + cfg.nuisance_dim, cfg.hidden_dim, cfg.visual_dim, cfg.map_gain)
    return World(prototypes, audio_map, visual_map)


def draw_clips(cfg: SyntheticConfig, world: World, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n clips of ``world``: (audio float64, visual float64, primary-class labels), before quantisation."""
    c, k = cfg.n_classes, cfg.latent_dim
    prototypes = world.prototypes
    primary = rng.integers(0, c, size=n)
    audio_latent = np.zeros((n, k))
    visual_latent = np.zeros((n, k))

    def add_event(rows: np.ndarray, classes: np.ndarray, weight: np.ndarray, heard: np.ndarray, seen: np.ndarray):
        # One instance per (clip, event), shared by what is heard and what is seen of it.
        instance = prototypes[classes] + cfg.instance_std * rng.standard_normal((len(rows), k))
        audio_latent[rows] += (weight * heard)[:, None] * instance
        visual_latent[rows] += (weight * seen)[:, None] * instance

    all_rows = np.arange(n)
    primary_missing = rng.random(n) < cfg.p_primary_missing
    missing_in_audio = rng.random(n) < 0.5
    add_event(all_rows, primary, np.ones(n), ~(primary_missing & missing_in_audio), ~(primary_missing & ~missing_in_audio))

    n_secondary = rng.integers(0, cfg.max_secondary + 1, size=n)
    for slot in range(cfg.max_secondary):
        rows = all_rows[n_secondary > slot]
        # A secondary event of another class than the primary one.
        classes = (primary[rows] + rng.integers(1, c, size=len(rows))) % c
        weight = rng.uniform(*cfg.secondary_weight, size=len(rows))
        u = rng.random(len(rows))
        offscreen = u < cfg.p_offscreen
        silent = (u >= cfg.p_offscreen) & (u < cfg.p_offscreen + cfg.p_silent)
        add_event(rows, classes, weight, ~silent, ~offscreen)

    audio_nuisance = cfg.nuisance_std * rng.standard_normal((n, cfg.nuisance_dim))
    visual_nuisance = cfg.nuisance_std * rng.standard_normal((n, cfg.nuisance_dim))
    audio = _apply_map(np.hstack([audio_latent, audio_nuisance]), world.audio_map)
    visual = np.maximum(_apply_map(np.hstack([visual_latent, visual_nuisance]), world.visual_map), 0.0)
    audio += cfg.noise_std * audio.std() * rng.standard_normal(audio.shape)
    visual += cfg.noise_std * visual.std() * rng.standard_normal(visual.shape)
    return audio, visual, primary


def generate(config: SyntheticConfig | None = None) -> PairedFeatures:
    """Generate paired clip features, primary-event labels, ids and a train/val/test split."""
    cfg = config or SyntheticConfig()
    if cfg.n_clips < 10 or cfg.n_classes < 2:
        raise ValueError("synthetic data needs at least 10 clips and 2 classes")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_clips
    audio, visual, primary = draw_clips(cfg, make_world(cfg, rng), n, rng)

    if cfg.quantize:
        # The model sees what a loader of real 8-bit features would give it.
        audio_out: np.ndarray = dequantize(_quantize(audio))
        visual_out: np.ndarray = dequantize(_quantize(visual))
    else:
        audio_out, visual_out = audio.astype(np.float32), visual.astype(np.float32)

    order = rng.permutation(n)
    n_train = int(round(cfg.split_fractions[0] * n))
    n_val = int(round(cfg.split_fractions[1] * n))
    split = np.empty(n, dtype=object)
    split[order[:n_train]] = SPLIT_NAMES[0]
    split[order[n_train : n_train + n_val]] = SPLIT_NAMES[1]
    split[order[n_train + n_val :]] = SPLIT_NAMES[2]

    return PairedFeatures(
        audio=audio_out,
        visual=visual_out,
        labels=primary.astype(np.int64),
        ids=[f"clip-{i:06d}" for i in range(n)],
        split=split.astype(str),
        source=f"synthetic(seed={cfg.seed}, n_clips={n}, n_classes={cfg.n_classes}, quantize={cfg.quantize})",
    )


def generate_chunks(config: SyntheticConfig, n_clips: int, chunk_rows: int = 100_000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]]:
    """A large collection of the same world as ``generate(config)``, in chunks that fit in memory.

    Yields (audio float32, visual float32, labels, ids) per chunk; ids are ``c{seed}-{row:09d}``,
    distinct from ``generate``'s. Chunk i draws its clips from the seed sequence (seed, 1, i), so
    the collection is a deterministic function of (config, chunk_rows). Features are float32 and
    never quantised: this is for indexes and benchmarks (10^6 clips are 4 GB of visual features).
    """
    if n_clips < 1 or chunk_rows < 1:
        raise ValueError("n_clips and chunk_rows must be ≥ 1")
    world = make_world(config)
    for index, start in enumerate(range(0, n_clips, chunk_rows)):
        rows = min(chunk_rows, n_clips - start)
        audio, visual, labels = draw_clips(config, world, rows, np.random.default_rng([config.seed, 1, index]))
        ids = [f"c{config.seed}-{row:09d}" for row in range(start, start + rows)]
        yield audio.astype(np.float32), visual.astype(np.float32), labels.astype(np.int64), ids
