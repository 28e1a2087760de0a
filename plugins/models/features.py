"""A small CNN classifier on clean data whose penultimate layer gives the features of the Fréchet
distance in `toolkit evaluate --metric fid` (trained by `toolkit train-features`)."""

from __future__ import annotations

from torch import Tensor, nn

from toolkit import limits
from toolkit.errors import ToolkitError


class FeatureCNN(nn.Module):
    """Two conv stages, a ``feature_dim`` ReLU layer (the features), and a class head.

    Images [C, H, W] of any size (adaptive pooling to 2×2) or vectors [D] (an MLP body).
    ``t`` is accepted and ignored, so the network also fits the Classifier protocol.
    """

    def __init__(self, sample_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 32,
                 feature_dim: int = 128):
        super().__init__()
        sample_shape = limits.sample_shape(sample_shape)
        width = limits.integer("width", width, 1, 65536)
        feature_dim = limits.integer("feature_dim", feature_dim, 1, 65536)
        num_classes = limits.classes(num_classes)
        if num_classes is None or int(num_classes) < 2:
            raise ToolkitError("a feature network is trained as a classifier: it needs at least two classes")
        self.sample_shape = sample_shape
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        if len(sample_shape) == 3:
            C = sample_shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(C, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * width * 4, feature_dim), nn.ReLU(),
            )
        elif len(sample_shape) == 1:
            self.body = nn.Sequential(nn.Linear(sample_shape[0], 4 * width), nn.ReLU(),
                                      nn.Linear(4 * width, feature_dim), nn.ReLU())
        else:
            raise ToolkitError(f"feature network needs [C, H, W] or [D] samples, got {sample_shape}")
        self.head = nn.Linear(feature_dim, self.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The [B, feature_dim] embedding the Fréchet distance is computed in."""
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ToolkitError(f"feature network expects samples of shape {self.sample_shape}, "
                               f"got {tuple(x.shape[1:])}")
        return self.body(x)

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        return self.head(self.features(x))
