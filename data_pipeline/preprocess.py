"""Pixel preprocessing before the VAE: ADM center crop (DiT/SiT/FlowDCN) and FiT-style mixed resize/crop into buckets.

Both return a PIL RGB image whose size is exactly the bucket ``(W, H)``; ``to_tensor`` maps it to [-1, 1].
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from PIL import Image

from data_pipeline.buckets import Bucket, make_bucket_table, nearest_bucket, square_table


@dataclass
class PreprocessConfig:
    """How images become fixed-size pixel arrays before encoding (recorded in the manifest)."""

    mode: str = "center_crop"  # "center_crop" (ADM, one square bucket) | "fit_mixed" (FiTv2-style, bucket table)
    resolution: int = 256  # center_crop: output side in px
    max_tokens: int = 256  # fit_mixed: token budget per image (16-px patches); 256 tokens = 256x256 px
    ar_min: float = 0.5  # fit_mixed: smallest bucket aspect ratio W/H
    ar_max: float = 3.0  # fit_mixed: largest bucket aspect ratio W/H
    num_ratios: int = 10  # fit_mixed: aspect ratios in linspace(ar_min, ar_max, num_ratios)
    include_square: bool = True  # fit_mixed: add the square bucket (the official VAR table does)
    resize_only_prob: float = 0.5  # fit_mixed: for images larger than the bucket, P(resize only) vs resize+crop
    seed: int = 0  # fit_mixed: the per-image choice and crop offset derive from (seed, image key)
    flip: bool = True  # also encode the horizontal flip of every image

    def bucket_table(self) -> List[Bucket]:
        """The bucket table this config assigns images to."""
        if self.mode == "center_crop":
            if self.resolution % 16:
                raise ValueError(f"preprocess.resolution={self.resolution} must be a multiple of 16")
            return square_table(self.resolution)
        if self.mode == "fit_mixed":
            return make_bucket_table(self.max_tokens, self.ar_min, self.ar_max, self.num_ratios, self.include_square)
        raise ValueError(f"preprocess.mode={self.mode!r}: expected 'center_crop' or 'fit_mixed'")


def center_crop_arr(img: Image.Image, size: int) -> Image.Image:
    """ADM center crop: BOX-halve while the short side >= 2*size, BICUBIC so the short side = size, crop the center."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def fit_mixed(img: Image.Image, bucket: Bucket, rng: random.Random, resize_only_prob: float = 0.5) -> Tuple[Image.Image, str]:
    """FiTv2-style: larger than the bucket in both sides -> resize only (p) or cover-resize + random crop (1-p);
    otherwise resize to fit the bucket. Returns (image of exactly the bucket size, the op used)."""
    bw, bh = bucket
    w, h = img.size
    if w > bw and h > bh and rng.random() >= resize_only_prob:
        # Keep the aspect ratio: scale so the image covers the bucket, then crop the excess at a random offset.
        while min(w / bw, h / bh) >= 2:  # BOX-halve first (anti-aliasing), as ADM does
            img = img.resize((w // 2, h // 2), resample=Image.BOX)
            w, h = img.size
        scale = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
        img = img.resize((nw, nh), resample=Image.BICUBIC)
        left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
        return img.crop((left, top, left + bw, top + bh)), "resize_crop"
    # Resize straight to the bucket: the aspect ratio changes only by the distance to the nearest bucket.
    while w >= 2 * bw and h >= 2 * bh:
        img = img.resize((w // 2, h // 2), resample=Image.BOX)
        w, h = img.size
    return img.resize((bw, bh), resample=Image.BICUBIC), "resize"


class Preprocessor:
    """Applies a PreprocessConfig to one PIL image: returns (bucket id, image of the bucket's size, op)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.table = cfg.bucket_table()

    def __call__(self, img: Image.Image, key: str) -> Tuple[int, Image.Image, str]:
        img = img.convert("RGB")  # grayscale, palette, RGBA (alpha dropped, as DiT's loader does)
        if self.cfg.mode == "center_crop":
            return 0, center_crop_arr(img, self.cfg.resolution), "center_crop"
        b = nearest_bucket(img.size[0], img.size[1], self.table)
        out, op = fit_mixed(img, self.table[b], _key_rng(self.cfg.seed, key), self.cfg.resize_only_prob)
        return b, out, op


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3,H,W] in [-1, 1] (x/127.5 - 1)."""
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _key_rng(seed: int, key: str) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))
