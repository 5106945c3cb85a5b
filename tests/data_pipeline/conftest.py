"""Fixtures for data_pipeline tests: a tiny random x8 AutoencoderKL on disk and real photos of several aspect ratios."""
import os

import numpy as np
import pytest
import torch


def make_tiny_vae(path: str) -> str:
    """Save a randomly initialised 4-block (x8) AutoencoderKL with small channels to ``path``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=64,
    )
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convs on a shared 2-core box run ~30x faster on one thread (no OpenMP spinning against other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


def skimage_photos():
    """(name, HxWxC uint8 or HxW) real photos bundled with scikit-image, several aspect ratios and modes."""
    from skimage import data

    return [
        ("astronaut", data.astronaut()),       # 512x512 RGB
        ("chelsea", data.chelsea()),           # 300x451
        ("coffee", data.coffee()),             # 400x600
        ("rocket", data.rocket()),             # 427x640
        ("page", data.page()),                 # 191x384 grayscale
        ("logo", data.logo()),                 # 500x500 RGBA
        ("text", data.text()),                 # 172x448 grayscale, wide
        ("cell", data.cell()),                 # 660x550 tall
    ]


def write_image_folder(root: str, photos=None, ext=".png") -> list:
    """Write photos into an ImageFolder tree with two classes; returns the relative paths in sorted order."""
    from PIL import Image

    photos = photos or skimage_photos()
    rels = []
    for i, (name, arr) in enumerate(photos):
        cls = "class_a" if i % 2 == 0 else "class_b"
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        rel = os.path.join(cls, name + ext)
        Image.fromarray(np.asarray(arr)).save(os.path.join(root, rel))
        rels.append(rel)
    return sorted(rels)


def varied_crops(n: int = 48, seed: int = 0):
    """``n`` crops of real photos with aspect ratios from ~0.4 to ~3 (sizes 40-200 px), as (name, array)."""
    rng = np.random.default_rng(seed)
    photos = [arr for _, arr in skimage_photos()[:4]]
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        h = int(rng.integers(40, min(200, arr.shape[0])))
        w = int(np.clip(h * rng.uniform(0.4, 3.0), 40, arr.shape[1]))
        top, left = int(rng.integers(0, arr.shape[0] - h + 1)), int(rng.integers(0, arr.shape[1] - w + 1))
        out.append((f"crop{i:03d}", arr[top: top + h, left: left + w]))
    return out


def encode_args(inp, out, vae_dir, fmt, *extra):
    """CLI arguments of the encode job used by the tests: FiT mixed buckets at a 16-token budget (<= 64x64 px)."""
    return ["--input", inp, "--out", out, "--vae", vae_dir, "--format", fmt, "--preprocess", "fit_mixed",
            "--max-tokens", "16", "--ar-min", "0.5", "--ar-max", "2.0", "--num-ratios", "4", "--unit-size", "16",
            "--batch-size", "16", "--workers", "2", "--torch-threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="session")
def latent_data(tmp_path_factory, tiny_vae_dir):
    """48 real-photo crops in 3 classes encoded by the tiny VAE into both formats: {"imgs", "wds", "mds"} dirs."""
    from data_pipeline.encode import main

    root = tmp_path_factory.mktemp("latent_data")
    photos = [(f"{name}", arr) for name, arr in varied_crops()]
    imgs = str(root / "imgs")
    for i, (name, arr) in enumerate(photos):
        from PIL import Image

        os.makedirs(os.path.join(imgs, f"c{i % 3}"), exist_ok=True)
        Image.fromarray(np.asarray(arr)).save(os.path.join(imgs, f"c{i % 3}", name + ".png"))
    out = {"imgs": imgs}
    for fmt in ("wds", "mds"):
        out[fmt] = str(root / fmt)
        assert main(encode_args(imgs, out[fmt], tiny_vae_dir, fmt)) == 0
    return out
