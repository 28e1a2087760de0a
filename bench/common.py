"""What the benchmarks share: a digits classifier whose penultimate layer gives the features for FD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import toolkit
from toolkit.metrics import frechet_distance

CACHE = Path(__file__).resolve().parent / ".cache"
STEPS = 300
BATCH = 128
LR = 2e-3
MIN_HOLDOUT_ACCURACY = 0.95


class DigitsCNN(nn.Module):
    """Two conv stages on 8×8 digits, a 128-d feature layer, a 10-way head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _fit(x: Tensor, y: Tensor, seed: int) -> DigitsCNN:
    """Adam with cross-entropy on seeded minibatches of (x, y)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _accuracy(model: DigitsCNN, x: Tensor, y: Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def load_classifier(seed: int = 0) -> tuple[DigitsCNN, float]:
    """The classifier trained on all digits (cached) and its recipe's held-out accuracy on a seeded 80/20 split."""
    path = CACHE / f"digits_cnn_seed{seed}_steps{STEPS}.safetensors"
    model = DigitsCNN()
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            holdout = float(fh.metadata()["holdout_accuracy"])
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False), holdout
    data = toolkit.create("dataset", "digits")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train, held = perm[: int(0.8 * len(data))], perm[int(0.8 * len(data)):]
    holdout = _accuracy(_fit(data.x[train], data.y[train], seed), data.x[held], data.y[held])
    if holdout < MIN_HOLDOUT_ACCURACY:
        raise RuntimeError(f"bench classifier reaches only {holdout:.3f} held-out accuracy; fix its recipe")
    model = _fit(data.x, data.y, seed)
    CACHE.mkdir(exist_ok=True)
    save_file(model.state_dict(), str(path), metadata={"holdout_accuracy": repr(holdout)})
    return model, holdout


class Judge:
    """Scores samples against the real digits: FD of classifier features, and class accuracy."""

    def __init__(self, seed: int = 0) -> None:
        self.model, self.holdout_accuracy = load_classifier(seed)
        self.real = toolkit.create("dataset", "digits").x
        self.real_features = self.features(self.real)

    @torch.no_grad()
    def features(self, x: Tensor) -> np.ndarray:
        return self.model.body(x.float()).numpy()

    @torch.no_grad()
    def predict(self, samples: Tensor) -> Tensor:
        """The class the judge assigns to each sample, [N] long."""
        return self.model(samples.float()).argmax(1)

    def score(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        """FD to the real digits and the fraction of samples classified as the label they were drawn for."""
        feats = self.features(samples)
        acc = (self.model.head(torch.from_numpy(feats)).argmax(1) == labels).float().mean()
        return {"fd": frechet_distance(self.real_features, feats), "accuracy": float(acc)}

    @torch.no_grad()
    def probs(self, samples: Tensor) -> np.ndarray:
        """p(y | x) of each sample, [N, 10]."""
        return F.softmax(self.model(samples.float()), dim=1).numpy()

    def real_reference(self, n: int, seed: int = 0) -> dict[str, float]:
        """What n real digits (a random subset, no repeats) score against all of them: FD, IS-like score, precision
        and recall. A reference at the same n, not a floor: FD is biased at small n, and a model can land below it."""
        from toolkit.metrics import inception_score, precision_recall

        idx = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed))[:n]
        feats = self.real_features[idx.numpy()]
        precision, recall = precision_recall(self.real_features, feats)
        return {"n": n, "fd": frechet_distance(self.real_features, feats),
                "is_like": inception_score(self.probs(self.real[idx])), "precision": precision, "recall": recall}

    def fd_floor(self, n: int, seed: int = 0) -> float:
        """FD of n real digits drawn with replacement: the value a perfect model scores with n samples."""
        idx = torch.randint(len(self.real), (n,), generator=torch.Generator().manual_seed(seed))
        return frechet_distance(self.real_features, self.real_features[idx.numpy()])
