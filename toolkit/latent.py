"""The latent wrapper of latent diffusion (Rombach et al. 2022): an autoencoder checkpoint, its scale factor
(1 / std of the latents over the data, so the diffusion model sees unit variance) and its fingerprint."""

from __future__ import annotations

import os
from typing import Any

import torch
from attrs import define
from torch import Tensor, nn

from toolkit.data import ArrayDataset
from toolkit.errors import CheckpointError, ToolkitError


@define(frozen=True)
class Latent:
    """encode: data → scaled latents; decode: scaled latents → data. ``source`` is how to find it again."""

    autoencoder: nn.Module
    scale_factor: float
    fingerprint: str
    source: str
    range: float | None = None  # max |scaled latent| over the real data (train-autoencoder records it)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.latent_shape)

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.autoencoder.sample_shape)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.autoencoder.encode(x) * self.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z / self.scale_factor)

    def to_json(self) -> dict[str, Any]:
        return {"autoencoder": self.source, "fingerprint": self.fingerprint, "scale_factor": self.scale_factor,
                "latent_shape": list(self.sample_shape), "data_shape": list(self.data_shape)}


def load_latent(name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> Latent:
    """An autoencoder checkpoint (directory or shipped name) as a Latent."""
    from toolkit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(name_or_path, device=device)
    if ckpt.kind != "autoencoder":
        raise ToolkitError(f"{str(ckpt.path)!r} holds a {ckpt.kind} checkpoint, not an autoencoder "
                           f"(make one with `toolkit train-autoencoder`)")
    info = ckpt.config.get("latent") or {}
    if "scale_factor" not in info or "fingerprint" not in info:
        raise CheckpointError(f"autoencoder {str(ckpt.path)!r} has no latent scale factor in its config.json")
    from toolkit.registry import available

    source = str(name_or_path)
    if not (os.sep not in source and source in available("pretrained")):
        source = str(ckpt.path.resolve())  # a directory: remembered by its absolute path
    latent_range = info.get("range")
    return Latent(ckpt.model, float(info["scale_factor"]), str(info["fingerprint"]), source,
                  float(latent_range) if isinstance(latent_range, (int, float)) and latent_range > 0 else None)


@torch.no_grad()
def encode_dataset(latent: Latent, data: ArrayDataset, device: torch.device, batch_size: int = 500) -> ArrayDataset:
    """The data set in latent space, encoded once (kept in memory), labels unchanged."""
    if tuple(data.sample_shape) != latent.data_shape:
        raise ToolkitError(f"autoencoder {latent.source!r} takes samples of shape {latent.data_shape}, "
                           f"dataset {data.name!r} has {tuple(data.sample_shape)}")
    latent.autoencoder.to(device).eval()
    z = torch.cat([latent.encode(data.x[i:i + batch_size].to(device)).cpu() for i in range(0, len(data), batch_size)])
    return ArrayDataset(name=data.name, x=z, y=data.y, num_classes=data.num_classes, levels=None,
                        class_names=data.class_names)


def check_pairing(config: dict[str, Any], latent: Latent) -> None:
    """A latent model must be composed with the autoencoder it was trained with (same fingerprint)."""
    recorded = (config.get("latent") or {}).get("fingerprint")
    if recorded is None:
        raise ToolkitError("this model was trained on data, not on latents: it takes no --latent autoencoder")
    if recorded != latent.fingerprint:
        raise ToolkitError(f"this latent model was trained with autoencoder {recorded}, not {latent.fingerprint} "
                           f"({latent.source}): its latents would mean nothing to it")
