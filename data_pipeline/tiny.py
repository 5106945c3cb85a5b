"""A tiny latent dataset for CPU smoke runs: real photo crops (scikit-image) -> tiny random VAE -> shards.

    python -m data_pipeline.tiny --out data/tiny_latents            # then configs/data/tiny_latents.yaml

Nothing is downloaded: the photos ship with scikit-image and the VAE is a randomly initialised 4-block (x8)
AutoencoderKL saved with ``save_pretrained`` (``--vae identity`` keeps pixel space instead). The latents mean
nothing visually; they exercise the real encode -> shards -> loader path with real aspect ratios.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def make_tiny_vae(path: str, seed: int = 0) -> str:
    """Save a randomly initialised x8 AutoencoderKL (4 blocks, 8-16 channels, ~60k params) to ``path``."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=64,
    )
    vae.save_pretrained(path, safe_serialization=True)
    return path


def photo_crops(n: int = 48, seed: int = 0):
    """``n`` crops of scikit-image's bundled photos, aspect ratios ~0.4-3, 40-200 px: [(name, HxWx3 uint8)]."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)]
        h = int(rng.integers(40, min(200, arr.shape[0])))
        w = int(np.clip(h * rng.uniform(0.4, 3.0), 40, arr.shape[1]))
        top, left = int(rng.integers(0, arr.shape[0] - h + 1)), int(rng.integers(0, arr.shape[1] - w + 1))
        out.append((f"crop{i:03d}", arr[top: top + h, left: left + w]))
    return out


def write_crops(root: str, n: int = 48, num_classes: int = 3, seed: int = 0) -> str:
    """Write ``photo_crops`` as an ImageFolder tree (class = index mod num_classes); returns ``root``."""
    from PIL import Image

    for i, (name, arr) in enumerate(photo_crops(n, seed)):
        d = os.path.join(root, f"c{i % num_classes}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(np.asarray(arr)).save(os.path.join(d, name + ".png"))
    return root


def main(argv=None) -> int:
    """Build ``<out>/images``, ``<out>/vae`` and the encoded ``<out>/latents`` (manifest.json inside)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--format", choices=["wds", "mds"], default="wds")
    p.add_argument("--vae", default="tiny-random", help="tiny-random | identity | a local AutoencoderKL dir")
    p.add_argument("--max-tokens", type=int, default=16, help="bucket budget (16 tokens = 64x64 px)")
    args = p.parse_args(argv)
    from data_pipeline.encode import main as encode

    images = write_crops(os.path.join(args.out, "images"), args.n, args.classes)
    vae = args.vae
    if vae == "tiny-random":
        vae = make_tiny_vae(os.path.join(args.out, "vae"))
    return encode(["--input", images, "--out", os.path.join(args.out, "latents"), "--vae", vae,
                   "--format", args.format, "--preprocess", "fit_mixed", "--max-tokens", str(args.max_tokens),
                   "--ar-min", "0.5", "--ar-max", "2.0", "--num-ratios", "4", "--unit-size", "16",
                   "--torch-threads", "1", "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
