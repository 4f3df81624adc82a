"""Regularised linear CCA (spec §5), in numpy float64.

Fitted on paired rows H1 (N×E1), H2 (N×E2): centre with the means, whiten
Σ11 = H1ᵀH1/(N−1) + r·I and Σ22 likewise, take the SVD of Σ11^{-1/2} Σ12 Σ22^{-1/2} = U S Vᵀ, and keep
the first ``n_components`` directions: A = Σ11^{-1/2} U, B = Σ22^{-1/2} V. A query is projected as
normalise((h − μ) A). Used both as the raw-feature baseline and as HSC-MAE's test-time projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CCAConfig:
    n_components: int = 10  # o': canonical directions kept (spec §5)
    ridge: float = 1e-4  # added to the diagonal of each covariance
    enabled: bool = True  # apply the test-time projection to evaluated and exported embeddings


@dataclass
class LinearCCA:
    mean_a: np.ndarray  # (E1,)
    mean_b: np.ndarray  # (E2,)
    proj_a: np.ndarray  # (E1, o')
    proj_b: np.ndarray  # (E2, o')
    correlations: np.ndarray  # (o',) canonical correlations on the fitting data

    def transform(self, x: np.ndarray, side: str) -> np.ndarray:
        """Project and L2-normalise rows of one side (``"a"`` or ``"b"``)."""
        mean, proj = (self.mean_a, self.proj_a) if side == "a" else (self.mean_b, self.proj_b)
        z = (np.asarray(x, dtype=np.float64) - mean) @ proj
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def to_dict(self) -> dict:
        return {k: np.asarray(v).tolist() for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearCCA":
        return cls(**{k: np.asarray(v, dtype=np.float64) for k, v in d.items()})


def _inverse_sqrt(sigma: np.ndarray) -> np.ndarray:
    eigval, eigvec = np.linalg.eigh(sigma)
    return (eigvec / np.sqrt(np.maximum(eigval, 1e-12))) @ eigvec.T


def fit_linear_cca(h1: np.ndarray, h2: np.ndarray, n_components: int = 10, ridge: float = 1e-4) -> LinearCCA:
    h1 = np.asarray(h1, dtype=np.float64)
    h2 = np.asarray(h2, dtype=np.float64)
    if h1.shape[0] != h2.shape[0] or h1.shape[0] < 2:
        raise ValueError(f"CCA needs the same number (≥2) of paired rows, got {h1.shape[0]} and {h2.shape[0]}")
    n_components = min(n_components, h1.shape[1], h2.shape[1])
    mean1, mean2 = h1.mean(axis=0), h2.mean(axis=0)
    c1, c2 = h1 - mean1, h2 - mean2
    n = h1.shape[0]
    s11 = c1.T @ c1 / (n - 1) + ridge * np.eye(h1.shape[1])
    s22 = c2.T @ c2 / (n - 1) + ridge * np.eye(h2.shape[1])
    s12 = c1.T @ c2 / (n - 1)
    w1, w2 = _inverse_sqrt(s11), _inverse_sqrt(s22)
    u, s, vt = np.linalg.svd(w1 @ s12 @ w2)
    return LinearCCA(
        mean_a=mean1,
        mean_b=mean2,
        proj_a=w1 @ u[:, :n_components],
        proj_b=w2 @ vt.T[:, :n_components],
        correlations=s[:n_components],
    )
