import os

# One thread per process: the suite is small-tensor bound, and OpenMP threads spinning on a shared
# 2-core machine (pytest plus a `toolkit` subprocess) slow everything down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOOLKIT_STRICT_PLUGINS", "0")
# compose and evaluate default to --backend auto, which exports each new pipeline (seconds per graph):
# the suite samples with torch unless a test asks otherwise (tests/test_backends.py tests the default).
os.environ.setdefault("TOOLKIT_BACKEND", "torch")
# Graphs exported by a test go to a cache of this test session, never the user's.
os.environ.setdefault("TOOLKIT_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="toolkit-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_registry():
    """Reload plugins before and after a test that adds fake ones."""
    from toolkit import registry

    registry.reset()
    yield registry
    registry._extra.clear()
    registry.reset()


TINY_UNET = {"base_channels": 8, "attention_heads": 2}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A class-conditional UNet trained 4 steps on digits: enough to test plumbing, not quality."""
    from toolkit.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train(TrainConfig(model_options=TINY_UNET, steps=4, batch_size=16, checkpoint_every=2, ema_decay=0.5), out)
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """A noise-aware digits classifier trained 3 steps: plumbing only."""
    from toolkit.training import TrainConfig, train

    out = tmp_path_factory.mktemp("clf") / "tiny-clf"
    train(TrainConfig(task="classifier", model="unet-encoder", model_options=TINY_UNET, steps=3, batch_size=16),
          out)
    return out
