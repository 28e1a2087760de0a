"""The value a dataset plugin returns: data in the toolkit's convention, plus what training records."""

from __future__ import annotations

import torch
from attrs import define, field
from torch import Tensor

from toolkit.errors import ToolkitError


@define(frozen=True)
class ArrayDataset:
    """Samples x (float32, [N, C, H, W] or [N, D], values in [-1, 1]) with optional labels y in 0..K-1.

    ``levels`` is the number of discrete values per dimension (17 for digits, 256 for 8-bit
    images, None for continuous data); the discretized decoder of the likelihood uses it.
    """

    name: str
    x: Tensor
    y: Tensor | None = None
    num_classes: int | None = None
    levels: int | None = None
    class_names: tuple[str, ...] | None = field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.x.ndim < 2 or self.x.shape[0] == 0:
            raise ToolkitError(f"dataset {self.name!r}: expected [N, ...] samples, got {tuple(self.x.shape)}")
        if not torch.isfinite(self.x).all():
            raise ToolkitError(f"dataset {self.name!r}: contains NaN or infinite values")
        if self.y is not None:
            if self.y.shape != (self.x.shape[0],):
                raise ToolkitError(f"dataset {self.name!r}: {self.x.shape[0]} samples but labels of shape {tuple(self.y.shape)}")
            if self.num_classes is None:
                raise ToolkitError(f"dataset {self.name!r}: labels given without num_classes")
            if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
                raise ToolkitError(f"dataset {self.name!r}: labels must lie in 0..{self.num_classes - 1}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


def levels_to_unit(values: Tensor, levels: int) -> Tensor:
    """Map integers 0..levels-1 to [-1, 1] (the bin centres of the discretized decoder)."""
    return values.to(torch.float32) / (levels - 1) * 2.0 - 1.0
