import numpy as np
import pytest
import torch
from PIL import Image

import toolkit


def test_digits():
    d = toolkit.create("dataset", "digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == torch.float32
    assert d.levels == 17 and d.num_classes == 10
    assert d.x.min() == -1 and d.x.max() == 1
    # 17 gray levels map onto 17 evenly spaced values
    assert torch.unique(d.x).numel() == 17
    assert torch.bincount(d.y).tolist()[:3] == [178, 182, 177]


def test_folder(tmp_path):
    for cls, value in (("a", 0), ("b", 255)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = toolkit.create("dataset", "folder", path=str(tmp_path), size=4)
    assert d.x.shape == (6, 3, 4, 4) and d.num_classes == 2
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.all(d.x[:3] == -1) and torch.all(d.x[3:] == 1)


def test_folder_errors(tmp_path):
    with pytest.raises(toolkit.ToolkitError, match="no images"):
        toolkit.create("dataset", "folder", path=str(tmp_path))
    with pytest.raises(toolkit.ToolkitError, match="not a directory"):
        toolkit.create("dataset", "folder", path=str(tmp_path / "missing"))


def test_array_npz_and_npy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 1, 4, 4)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2, 1, 0]))
    d = toolkit.create("dataset", "array", path=str(tmp_path / "d.npz"))
    assert d.num_classes == 3 and d.levels == 256
    assert torch.allclose(d.x, torch.from_numpy(x).float() / 255 * 2 - 1)
    np.save(tmp_path / "v.npy", np.zeros((7, 2), np.float32))
    assert toolkit.create("dataset", "npy", path=str(tmp_path / "v.npy")).sample_shape == (2,)


@pytest.mark.parametrize("name,classes", [("moons", None), ("swissroll", None), ("gaussians8", 8)])
def test_toys(name, classes):
    d = toolkit.create("dataset", name, n=1000)
    assert d.x.shape == (1000, 2) and d.num_classes == classes
    assert d.x.abs().max() < 10
