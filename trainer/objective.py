"""Per-sample training noise keyed by the global sample position, and the flow loss that consumes it.

The noise of a sample (its t, ε and label-dropout draw) depends only on (seed, global position in
the run), never on the rank that holds it or on the micro-batch it sits in. So 1 process and N
processes with the same global batch see identical draws, gradient accumulation does not change
them, and a resumed run needs no saved RNG state.

The loss is the same maths as ``modeling.objective.FlowMatchingLoss`` (tests compare the two with
identical draws); only the source of the draws differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling.objective import FlowMatchingConfig, sample_t

_MASK = 0xFFFFFFFFFFFFFFFF


def seed64(*words: int) -> int:
    """SplitMix64 over the words -> a 63-bit torch.Generator seed (cheap, well mixed, no global state)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & _MASK)) & _MASK
        h = (h + 0x9E3779B97F4A7C15) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class StepNoise:
    """The draws of a batch: times t [N], noise ε [N, C, H, W], label-dropout mask [N]."""

    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor

    def slice(self, lo: int, hi: int) -> "StepNoise":
        """The draws of samples [lo, hi) (a micro-batch)."""
        return StepNoise(self.t[lo:hi], self.eps[lo:hi], self.drop[lo:hi])


def draw_noise(cfg: FlowMatchingConfig, seed: int, positions: list[int], shape: tuple[int, ...]) -> StepNoise:
    """Draws for samples at the given global positions; row i depends only on (seed, positions[i])."""
    ts, eps, us = [], torch.empty((len(positions), *shape)), []
    for i, pos in enumerate(positions):
        g = torch.Generator().manual_seed(seed64(seed, pos))
        ts.append(sample_t(1, cfg, g))                     # same draw order as FlowMatchingLoss: t, ε, dropout
        torch.randn(shape, generator=g, out=eps[i])
        us.append(torch.rand(1, generator=g))
    return StepNoise(torch.cat(ts), eps, torch.cat(us) < cfg.label_dropout)


def flow_loss(net, x: torch.Tensor, y: torch.Tensor, noise: StepNoise, null_class: int) -> torch.Tensor:
    """Per-sample loss mean_{C,H,W} (net(x_t, t, y') − (x − ε))², x_t = t·x + (1−t)·ε, y' = null where dropped."""
    N, dev = x.shape[0], x.device
    t = noise.t.to(dev)                                                            # (N,)
    eps = noise.eps.to(dev, x.dtype)                                               # (N, C, H, W)
    y = torch.where(noise.drop.to(dev), torch.full_like(y, null_class), y)         # (N,)
    tb = t.view(N, *([1] * (x.dim() - 1))).to(x.dtype)
    x_t = tb * x + (1 - tb) * eps                                                  # (N, C, H, W)
    v = net(x_t, t, y)                                                             # (N, C, H, W)
    return (v.float() - (x - eps).float()).pow(2).flatten(1).mean(1)               # (N,)
