"""Arbitrary-resolution S_max policies: per-block, per-axis receptive-field scale from the target grid and t.

A policy maps (target grid, t) to a [depth, 2] tensor of (S_max,x, S_max,y) per block. The model
takes it as its ``s_max`` forward argument; ``with_smax_policy`` wraps a model into a sampler's
``fn(x, t, y)`` so the samplers stay policy-agnostic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .msdcn import TRAIN_SMAX


@dataclass
class OfficialSmaxPolicy:
    """The official scale adjustment (var_sampling.py): enlarge S_max in the middle blocks while t is noisy.

    For blocks j with ``margin < j < depth − margin`` and ``t < t_threshold``:
    m(t) = 1 + (t_threshold − t)/t_threshold (2 at t=0, 1 at t=t_threshold); per axis
    S_max,a = base · min(m(t), max(1, grid_a / train_grid_a)). Every other block keeps ``base``.
    """

    train_grid: tuple[int, int] = (16, 16)   # (h, w) tokens at training resolution (256 px, patch 2)
    base: float = TRAIN_SMAX
    margin: int = 4
    t_threshold: float = 0.6

    def __call__(self, grid: tuple[int, int], t: float, depth: int) -> torch.Tensor:
        h, w = grid
        r = torch.tensor([max(1.0, w / self.train_grid[1]), max(1.0, h / self.train_grid[0])])   # (x, y)
        out = torch.full((depth, 2), self.base)
        if t < self.t_threshold:
            m = 1.0 + (self.t_threshold - t) / self.t_threshold
            for j in range(depth):
                if self.margin < j < depth - self.margin:
                    out[j] = self.base * torch.clamp(r, max=m)
        return out


@dataclass
class ConstantRatioSmaxPolicy:
    """S_max,a = base · max(min_ratio, grid_a / train_grid_a) in every block and at every t (optionally capped)."""

    train_grid: tuple[int, int] = (16, 16)
    base: float = TRAIN_SMAX
    min_ratio: float = 1.0                    # 1.0: never shrink below the training receptive field
    max_ratio: float = float("inf")

    def __call__(self, grid: tuple[int, int], t: float, depth: int) -> torch.Tensor:
        h, w = grid
        r = torch.tensor([w / self.train_grid[1], h / self.train_grid[0]]).clamp(self.min_ratio, self.max_ratio)
        return (self.base * r).expand(depth, 2).clone()


def build_smax_policy(name: str, **kwargs):
    """'official' | 'constant' | 'none' (training value everywhere) -> policy or None."""
    if name in (None, "none", "train"):
        return None
    if name == "official":
        return OfficialSmaxPolicy(**kwargs)
    if name == "constant":
        return ConstantRatioSmaxPolicy(**kwargs)
    raise ValueError(f"unknown S_max policy {name!r} (official | constant | none)")


def with_smax_policy(model, policy=None):
    """A sampler callable fn(x, t, y) that feeds ``model`` the policy's per-block S_max for x's grid and t."""
    if policy is None:
        return lambda x, t, y: model(x, t, y)
    p, depth = model.patch_size, len(model.blocks)

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # All samples of a sampler step share t; CFG halves share the value too (as in the official code).
        s_max = policy((x.shape[-2] // p, x.shape[-1] // p), float(t.flatten()[0]), depth).to(x.device)
        return model(x, t, y, s_max=s_max)

    return fn
