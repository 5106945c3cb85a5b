"""Fixtures for evaluation tests: a tiny FlowDCN checkpoint (trainer layout), a tiny x8 VAE, a tiny reference npz."""
import json
import os

import numpy as np
import pytest
import torch

from data_pipeline.tiny import make_tiny_vae   # the same tiny x8 VAE the data tests and smoke sets use


def make_tiny_ckpt(path: str, name: str = "FlowDCN-debug", **overrides) -> str:
    """A checkpoint directory with ema.safetensors + model metadata, as the trainer writes it."""
    from safetensors.torch import save_file

    from modeling import build_model

    torch.manual_seed(0)
    overrides = {"num_classes": 10, "msdcn_impl": "torch", **overrides}
    model = build_model(name, **overrides)
    with torch.no_grad():  # the final layer is zero-initialised; give it weights so samples differ per noise/label
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "ema.safetensors"),
              metadata={"model": name, "model_overrides": json.dumps(overrides)})
    return path


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_ckpt(str(tmp_path_factory.mktemp("ckpt") / "step_000100"))


@pytest.fixture(scope="session")
def tiny_ref_npz(tmp_path_factory):
    """An ADM-style reference batch with only arr_0 (random smooth uint8 images)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(24, 4, 4, 3)).astype(np.float32)
    imgs = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)                 # (24, 32, 32, 3) blocky images
    imgs = np.clip(imgs + rng.normal(0, 8, imgs.shape), 0, 255).astype(np.uint8)
    path = str(tmp_path_factory.mktemp("ref") / "ref_batch.npz")
    np.savez(path, arr_0=imgs)
    return path
