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


def inception_score(probs: np.ndarray) -> float:
    """exp E_x KL(p(y|x) ‖ p(y)) of [N, K] class probabilities (Salimans et al. 2016, with any classifier): K when
    every sample is confidently one class and the classes are balanced, 1 when every sample gets the same p(y|x)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    if p.ndim != 2 or len(p) < 1:
        raise ValueError(f"need [N, K] probabilities, got shape {p.shape}")
    p = p / p.sum(1, keepdims=True)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def _distances(a: np.ndarray, b: np.ndarray, chunk: int = 1024):
    """Euclidean distances [len(a) chunk, len(b)], a chunk of rows at a time (memory bounded by chunk × len(b))."""
    b2 = (b ** 2).sum(1)
    for start in range(0, len(a), chunk):
        block = a[start:start + chunk]
        yield np.sqrt(np.maximum((block ** 2).sum(1)[:, None] + b2[None, :] - 2 * block @ b.T, 0))


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    return np.concatenate([np.sort(d, axis=1)[:, k] for d in _distances(x, x)])  # column 0 is the point itself


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    return float(np.concatenate([(d <= radii[None, :]).any(1) for d in _distances(points, centres)]).mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of [N, D] features: precision is the fraction of
    samples inside the real manifold (the union of balls reaching each real point's k-th neighbour), recall the
    fraction of real points inside the samples' manifold. Quality against coverage, which FD mixes."""
    a, b = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) <= k:
        raise ValueError(f"need two [N, D] feature arrays with N > k and equal D, got {a.shape} and {b.shape}")
    return _covered(b, a, _kth_neighbour_radii(a, k)), _covered(a, b, _kth_neighbour_radii(b, k))
