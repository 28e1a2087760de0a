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


def test_inception_score_bounds_and_a_worked_value():
    from toolkit.metrics import inception_score

    K = 10
    confident = np.eye(K)[np.arange(100) % K]  # every sample one class, classes balanced
    assert inception_score(confident) == pytest.approx(K, rel=1e-6)
    assert inception_score(np.full((50, K), 1 / K)) == pytest.approx(1.0)
    assert inception_score(np.eye(K)[np.zeros(40, int)]) == pytest.approx(1.0, rel=1e-6)  # one class only
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = p.mean(0)
    want = np.exp(np.mean([(row * np.log(row / m)).sum() for row in p]))
    assert inception_score(p) == pytest.approx(want, rel=1e-9)


def test_precision_and_recall_separate_quality_from_coverage():
    from toolkit.metrics import precision_recall

    g = np.random.default_rng(0)
    real = g.normal(size=(400, 2))
    same = g.normal(size=(400, 2))
    p, r = precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    collapsed = g.normal(size=(400, 2)) * 0.1  # samples of one mode: good, but no coverage
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3
    off = g.normal(size=(400, 2)) + 10.0  # nothing like the data
    assert precision_recall(real, off) == (0.0, 0.0)
    # a worked example: real on a line, k = 1, radii = the gap to the neighbour
    line = np.array([[0.0, 0], [1, 0], [2, 0], [3, 0]])
    p, r = precision_recall(line, np.array([[0.5, 0], [10, 0], [1.5, 0]]), k=1)
    assert p == pytest.approx(2 / 3)
