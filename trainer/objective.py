"""Per-sample training noise keyed by the global sample position, and the flow loss that consumes it.

The noise of a sample (its t, ε and label-dropout draw) depends only on (seed, global position in
the run), never on the rank that holds it or on the micro-batch it sits in. So 1 process and N
processes with the same global batch see identical draws, gradient accumulation does not change
them, and a resumed run needs no saved RNG state.

The loss itself is ``modeling.objective.flow_matching_loss``; only the source of the draws differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modeling.objective import FlowMatchingConfig, flow_matching_loss, sample_t

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

    def to(self, device: torch.device) -> "StepNoise":
        """The draws on ``device``; to a GPU through pinned memory without blocking (a plain copy from
        pageable memory would synchronise the stream and stall the launch queue once per step)."""
        if device.type != "cuda":
            return StepNoise(self.t.to(device), self.eps.to(device), self.drop.to(device))
        return StepNoise(*(v.pin_memory().to(device, non_blocking=True) for v in (self.t, self.eps, self.drop)))

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
    """Per-sample flow-matching loss (modeling.objective) with this batch's position-keyed draws."""
    return flow_matching_loss(net, x, y, noise.t, noise.eps, noise.drop, null_class)
