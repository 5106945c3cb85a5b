"""The MSDCN token mixer: one packed projection of the normalised tokens -> cuda_ext.msdcn_deform_packed -> output projection."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from cuda_ext import msdcn_deform_packed

from .layers import concat_linear

TRAIN_SMAX = 6.0  # S_max used in training (official flowdcn.py L82)


def prior_grid(kernel_points: int) -> torch.Tensor:
    """Prior sampling points p_k = (x, y): an n×n grid over [-1, 1]², n = ⌈√K⌉, row-major in y, first K points.

    For K = 9 this is the official 3×3 grid (-1,-1), (0,-1), (1,-1), (-1,0), ... (1,1); unlike the
    official code it is defined for any K (official bug M4 left extra points random).
    """
    n = max(2, math.ceil(math.sqrt(kernel_points)))
    lin = torch.linspace(-1, 1, n, dtype=torch.float32)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)[:kernel_points].contiguous()   # (K, 2)


class MultiScaleDCN(nn.Module):
    """Groupwise multi-scale deformable convolution (FlowDCN's replacement for attention)."""

    def __init__(self, dim: int, groups: int, kernel_points: int = 9, rounding: str = "floor", impl: str = "auto"):
        super().__init__()
        if dim % groups:
            raise ValueError(f"hidden size {dim} must be divisible by the number of groups {groups}")
        self.dim, self.groups, self.kernel_points = dim, groups, kernel_points
        self.channels = dim // groups
        self.rounding, self.impl = rounding, impl
        G, K = groups, kernel_points
        self.v = nn.Linear(dim, G * self.channels, bias=True)
        self.qk_deformables = nn.Linear(dim, G * K * 2, bias=True)   # Δ, ordered (g, k, {x, y})
        self.qk_scales = nn.Linear(dim, G * K, bias=False)           # ŝ before the per-group logit s0
        self.qk_weights = nn.Linear(dim, G * K, bias=True)           # unnormalised aggregation weights
        self.out = nn.Linear(G * self.channels, dim, bias=True)
        self.deformables_scale = nn.Parameter(torch.empty(G))         # s0_g logits, [G] (official: [1,1,1,G,1,1])
        # A buffer, not a parameter (official bug M5); recomputed by init_weights() after meta init.
        self.register_buffer("deformables_prior", prior_grid(K), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init: v/out default with zero bias; Δ, ŝ and the weight matrix zero; weight bias default."""
        for lin in (self.v, self.qk_deformables, self.qk_scales, self.qk_weights, self.out):
            lin.reset_parameters()
        nn.init.zeros_(self.v.bias)
        nn.init.zeros_(self.out.bias)
        nn.init.zeros_(self.qk_deformables.weight)
        nn.init.zeros_(self.qk_deformables.bias)
        nn.init.zeros_(self.qk_scales.weight)
        nn.init.zeros_(self.qk_weights.weight)   # bias keeps its random default (official quirk M10)
        # s0_g = logit((g+1)/G − 1e-4): initial scales σ(s0)·S_max spread over (0, S_max].
        q = (torch.arange(self.groups, dtype=torch.float64) + 1) / self.groups - 1e-4
        self.deformables_scale.copy_(torch.log(q / (1 - q)).to(self.deformables_scale.dtype))
        self.deformables_prior = prior_grid(self.kernel_points).to(self.deformables_scale.device)

    # Parameters of children that forward() reads directly instead of calling the child (see _proj): a
    # strategy that gathers parameters per called module (DeepSpeed ZeRO-3) must gather these with this module.
    reads_child_params = ("v", "qk_deformables", "qk_scales", "qk_weights")

    def _proj(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., G*C + 4*G*K]: value | Δ | ŝ | weight logits (cuda_ext.split_packed's layout) from one GEMM
        (see concat_linear); ŝ has no bias (official), hence the zeros in the concatenated bias. The MSDCN kernels read
        the four parts in place and write their grads in place, so neither a split nor a concatenation is copied."""
        b = torch.cat([self.v.bias, self.qk_deformables.bias, torch.zeros_like(self.qk_weights.bias), self.qk_weights.bias])
        W = [self.v.weight, self.qk_deformables.weight, self.qk_scales.weight, self.qk_weights.weight]
        return concat_linear(x, W, b)

    def forward(self, x: torch.Tensor, s_max: torch.Tensor) -> torch.Tensor:
        """x [N, h, w, D], s_max [2] (x, y) -> [N, h, w, D]."""
        N, h, w, _ = x.shape
        G, K, C = self.groups, self.kernel_points, self.channels
        proj = self._proj(x)                                                      # (N, h, w, G*C + 4GK)
        y = msdcn_deform_packed(proj, self.deformables_prior, self.deformables_scale, s_max, groups=G, points=K,
                                rounding=self.rounding, impl=self.impl)           # (N, h, w, G, C)
        return self.out(y.reshape(N, h, w, G * C))                                # (N, h, w, D)
