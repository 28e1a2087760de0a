"""Sample-quality metrics as pure numpy functions."""

from __future__ import annotations

import numpy as np


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """‖μ_a-μ_b‖² + tr(Σ_a + Σ_b - 2 (Σ_a^½ Σ_b Σ_a^½)^½) between Gaussians fitted to [N, D] features."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [N, D] feature arrays with N >= 2 and equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    m = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross))


def class_entropy(probs: np.ndarray) -> float:
    """Entropy (nats) of the mean class distribution of [N, K] probabilities: log K when classes are balanced."""
    p = np.asarray(probs, np.float64).mean(0)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())
