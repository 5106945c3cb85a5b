"""Classifier-free guidance as a wrapper around a velocity function (DiT's forward_with_cfg, generalised)."""
from __future__ import annotations

import torch


def cfg_wrapper(model_fn, scale: float, null_class: int, interval: tuple[float, float] | None = None):
    """fn(x, t, y) = u + scale·(c − u) with u, c from one batched pass over [null labels; labels].

    Guidance applies to all channels (official FlowDCN). With ``interval=(lo, hi)`` it applies
    only while lo <= t <= hi; outside, one conditional pass is made (half the cost).
    """
    if scale == 1.0:
        return model_fn

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if interval is not None:
            t0 = float(t.flatten()[0])
            if not (interval[0] <= t0 <= interval[1]):
                return model_fn(x, t, y)
        v = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(y, null_class), y]))
        u, c = v.chunk(2)                                                          # (N, C, H, W) each
        return u + scale * (c - u)

    return fn
