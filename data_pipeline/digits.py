"""The built-in demo dataset: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes), in pixel space.

It ships inside scikit-learn, so the demo needs no download. The source follows the loader contract
of data_pipeline.loader: batches ``{"x", "y", "nimg_global"}``, an order that is a pure function of
(seed, epoch, position), the position counted in samples seen globally, and ``state_dict()`` that
restores the exact next batch for the same or a different world size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class DigitsConfig:
    """Options of the digits source."""

    global_batch: int = 128      # images per step over all ranks
    seed: int = 0
    resolution: int = 8          # 8 = native; 16/32 upsample bilinearly (more tokens per image)


def load_digits_tensors(resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as images in [-1, 1], [1797, 1, r, r] float32, and labels [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1).unsqueeze(1)  # (1797, 1, 8, 8)
    if resolution != 8:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(d.target.astype(np.int64))


class DigitsSource:
    """Infinite, epoch-permuted, rank-sliced digits batches; resumable by global sample position."""

    num_classes = 10

    def __init__(self, cfg: DigitsConfig, rank: int = 0, world_size: int = 1):
        if cfg.global_batch % world_size:
            raise ValueError(f"digits: global_batch {cfg.global_batch} is not divisible by world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.x, self.y = load_digits_tensors(cfg.resolution)
        self.position = 0            # samples consumed globally

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.y))

    def _global_indices(self, start: int, count: int) -> np.ndarray:
        n = len(self.y)
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, n)
            take = min(count - len(out), n - offset)
            out.extend(self._order(epoch)[offset: offset + take])
            pos += take
        return np.asarray(out)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        gb = self.cfg.global_batch
        per_rank = gb // self.world_size
        idx = self._global_indices(self.position, gb)[self.rank * per_rank: (self.rank + 1) * per_rank]
        self.position += gb
        t = torch.from_numpy(idx)
        return {"x": self.x[t], "y": self.y[t], "nimg_global": gb}

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.cfg.seed, "global_batch": self.cfg.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise ValueError(f"digits: checkpoint seed {state['seed']} differs from the configured seed {self.cfg.seed}")
        self.position = int(state["position"])
