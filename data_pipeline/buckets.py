"""Aspect-ratio bucket tables: generated from a token budget and an aspect-ratio range, nearest-bucket assignment.

A bucket is a pixel size ``(width, height)`` with both sides multiples of 16 px (VAE x8, patch x2), so it has
``(width/16)*(height/16)`` tokens. ``make_bucket_table(max_tokens, ar_min, ar_max, num)`` follows the official
FlowDCN VAR rule (flowdcn.md §6.3) generalised to any budget: for each aspect ratio ``ar = W/H`` in
``linspace(ar_min, ar_max, num)``::

    base   = 16 * sqrt(max_tokens)                 # 256 px for 256 tokens
    width  = floor(base * sqrt(ar) / 16) * 16
    height = floor(base / sqrt(ar) / 16) * 16      # so width/16 * height/16 <= max_tokens

plus the square bucket ``base x base`` when ``include_square``. Duplicate sizes are removed; buckets are sorted by
aspect ratio. The official VAR table is ``make_bucket_table(256, 0.5, 3.0, 10)``:

    W x H: 176x352 224x288 256x240 256x256 288x208 320x192 336x176 368x160 400x160 416x144 432x144
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

PATCH_PX = 16  # VAE downsampling (8) x patch size (2)

Bucket = Tuple[int, int]  # (width_px, height_px)


def make_bucket_table(max_tokens: int, ar_min: float = 0.5, ar_max: float = 3.0, num: int = 10,
                      include_square: bool = True) -> List[Bucket]:
    """Buckets ``[(W, H), ...]`` sorted by W/H; every bucket has at most ``max_tokens`` tokens."""
    if max_tokens < 1 or not (0 < ar_min <= ar_max) or num < 1:
        raise ValueError(f"bad bucket spec: max_tokens={max_tokens} ar=[{ar_min}, {ar_max}] num={num}")
    base = PATCH_PX * math.sqrt(max_tokens)
    ars = [ar_min] if num == 1 else [ar_min + (ar_max - ar_min) * i / (num - 1) for i in range(num)]
    sizes = set()
    for ar in ars:
        w = int(base * math.sqrt(ar) // PATCH_PX) * PATCH_PX
        h = int(base / math.sqrt(ar) // PATCH_PX) * PATCH_PX
        if w < PATCH_PX or h < PATCH_PX:
            raise ValueError(f"aspect ratio {ar:.3f} leaves a side under {PATCH_PX} px at {max_tokens} tokens")
        sizes.add((w, h))
    if include_square:
        side = int(base // PATCH_PX) * PATCH_PX
        sizes.add((side, side))
    return sorted(sizes, key=lambda b: (b[0] / b[1], b[0]))


def square_table(resolution: int) -> List[Bucket]:
    """The single bucket of ADM center-crop data at ``resolution`` px."""
    return [(resolution, resolution)]


def nearest_bucket(width: int, height: int, table: Sequence[Bucket]) -> int:
    """Index of the bucket whose aspect ratio is closest to ``width/height`` in log space (ties: first)."""
    lar = math.log(width / height)
    return min(range(len(table)), key=lambda i: abs(math.log(table[i][0] / table[i][1]) - lar))


def tokens(bucket: Bucket) -> int:
    """Transformer tokens of a bucket (16-px patches)."""
    return (bucket[0] // PATCH_PX) * (bucket[1] // PATCH_PX)
