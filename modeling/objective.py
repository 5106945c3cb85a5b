"""Rectified-flow objective (SiT / FlowDCN convention): x_t = t·x + (1−t)·ε, target v = x − ε, t=0 is noise."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlowMatchingConfig:
    """Objective options (official recipe: uniform t, 10% null labels)."""

    t_sampler: str = "uniform"       # "uniform" | "logit_normal"
    logit_mean: float = 0.0          # m of t = sigmoid(N(m, s²))
    logit_std: float = 1.0           # s
    label_dropout: float = 0.1       # probability of replacing the label by the null class (CFG training)


def sample_t(n: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times t ∈ (0, 1) from the configured distribution."""
    if cfg.t_sampler == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if cfg.t_sampler == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown t_sampler {cfg.t_sampler!r} (uniform | logit_normal)")


class FlowMatchingLoss:
    """Per-sample loss: mean over (C, H, W) of (net(x_t, t, y) − (x − ε))²."""

    def __init__(self, cfg: FlowMatchingConfig, null_class: int):
        self.cfg = cfg
        self.null_class = null_class

    def __call__(self, net, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        N = x.shape[0]
        dev = x.device
        # Draw on the generator's device (CPU by default) so the draws don't depend on where x lives.
        gdev = generator.device if generator is not None else dev
        t = sample_t(N, self.cfg, generator, gdev).to(dev)                          # (N,)
        eps = torch.randn(x.shape, generator=generator, device=gdev).to(dev, x.dtype)
        drop = torch.rand(N, generator=generator, device=gdev).to(dev) < self.cfg.label_dropout
        y = torch.where(drop, torch.full_like(y, self.null_class), y)
        tb = t.view(N, *([1] * (x.dim() - 1))).to(x.dtype)
        x_t = tb * x + (1 - tb) * eps                                              # (N, C, H, W)
        v = net(x_t, t, y)                                                         # (N, C, H, W)
        return (v.float() - (x - eps).float()).pow(2).flatten(1).mean(1)           # (N,)
