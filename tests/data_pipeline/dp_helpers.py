"""Helpers shared by the data_pipeline tests (a uniquely named module: several test dirs have a conftest)."""
import os

import numpy as np


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


def encode_args(inp, out, vae_dir, fmt, *extra):
    """CLI arguments of the encode job used by the tests: FiT mixed buckets at a 16-token budget (<= 64x64 px)."""
    return ["--input", inp, "--out", out, "--vae", vae_dir, "--format", fmt, "--preprocess", "fit_mixed",
            "--max-tokens", "16", "--ar-min", "0.5", "--ar-max", "2.0", "--num-ratios", "4", "--unit-size", "16",
            "--batch-size", "16", "--workers", "2", "--torch-threads", "1", "--no-progress", *extra]
