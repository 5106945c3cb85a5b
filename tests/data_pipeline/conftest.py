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
