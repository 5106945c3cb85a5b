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


def flow_matching_loss(net, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, drop: torch.Tensor,
                       null_class: int) -> torch.Tensor:
    """Per-sample loss mean_{C,H,W} (net(x_t, t, y') − (x − ε))², x_t = t·x + (1−t)·ε, y' = null where ``drop``."""
    N, dev = x.shape[0], x.device
    t = t.to(dev)                                                                  # (N,)
    eps = eps.to(dev, x.dtype)                                                     # (N, C, H, W)
    y = torch.where(drop.to(dev), torch.full_like(y, null_class), y)               # (N,)
    tb = t.view(N, *([1] * (x.dim() - 1))).to(x.dtype)
    x_t = tb * x + (1 - tb) * eps                                                  # (N, C, H, W)
    v = net(x_t, t, y)                                                             # (N, C, H, W)
    return (v.float() - (x - eps).float()).pow(2).flatten(1).mean(1)               # (N,)


class FlowMatchingLoss:
    """Per-sample flow-matching loss with its own draws of t, ε and label dropout from ``generator``."""

    def __init__(self, cfg: FlowMatchingConfig, null_class: int):
        self.cfg = cfg
        self.null_class = null_class

    def __call__(self, net, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        N = x.shape[0]
        # Draw on the generator's device (CPU by default) so the draws don't depend on where x lives.
        gdev = generator.device if generator is not None else x.device
        t = sample_t(N, self.cfg, generator, gdev)                                 # (N,)
        eps = torch.randn(x.shape, generator=generator, device=gdev)
        drop = torch.rand(N, generator=generator, device=gdev) < self.cfg.label_dropout
        return flow_matching_loss(net, x, y, t, eps, drop, self.null_class)
