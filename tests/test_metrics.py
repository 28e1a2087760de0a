import numpy as np
import pytest

from toolkit.metrics import class_entropy, frechet_distance


def test_frechet_distance_of_gaussians():
    """For diagonal Gaussians FD = Σ (μ_a-μ_b)² + Σ (σ_a-σ_b)² (computed here from the parameters)."""
    rng = np.random.default_rng(0)
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    sd_a, sd_b = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    a = mu_a + sd_a * rng.standard_normal((400_000, 3))
    b = mu_b + sd_b * rng.standard_normal((400_000, 3))
    expect = ((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expect, rel=0.01)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))


def test_class_entropy():
    assert class_entropy(np.eye(4)) == pytest.approx(np.log(4))
    assert class_entropy(np.tile([1.0, 0, 0], (5, 1))) == pytest.approx(0.0)
