"""FlowDCN: a DiT-style latent flow model whose attention is a groupwise multi-scale deformable conv.

Follows the official code's math and initialisation (../shared/reference/flowdcn.md §1-§4) with its
bugs fixed: any latent H×W divisible by the patch size, construction on any device (meta included)
followed by init_weights(), S_max as an explicit per-block, per-axis forward argument.
The model knows nothing about distribution: a strategy wraps ``blocks`` and ``final_layer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import FlowBackbone, RMSNorm, SwiGLU, modulate, unpatchify
from .msdcn import TRAIN_SMAX, MultiScaleDCN


@dataclass
class FlowDCNConfig:
    """Architecture hyper-parameters (modeling/registry.py holds the official sizes)."""

    hidden_size: int = 1152
    depth: int = 28
    groups: int = 16              # MSDCN groups (= SiT heads); channels per group = hidden_size / groups
    kernel_points: int = 9        # K
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 4
    num_classes: int = 1000       # label num_classes is the null class
    learn_sigma: bool = False     # official configs: True (8 output channels, the last 4 unused)
    adaln_zero: bool = False      # official FlowDCN: False (default-initialised block adaLN)
    rounding: str = "floor"       # "trunc" reproduces the official kernel (released checkpoints)
    msdcn_impl: str = "auto"      # "auto" | "torch" | "cuda"

    @property
    def mlp_hidden(self) -> int:
        return int(2 * int(self.hidden_size * self.mlp_ratio) / 3)


class FlowDCNBlock(nn.Module):
    """adaLN block: x += gate·MSDCN(mod(RMSNorm(x))); x += gate·SwiGLU(mod(RMSNorm(x)))."""

    def __init__(self, cfg: FlowDCNConfig):
        super().__init__()
        D = cfg.hidden_size
        self.adaln_zero = cfg.adaln_zero
        self.norm1 = RMSNorm(D)
        self.attn = MultiScaleDCN(D, cfg.groups, cfg.kernel_points, cfg.rounding, cfg.msdcn_impl)
        self.norm2 = RMSNorm(D)
        self.mlp = SwiGLU(D, cfg.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.ones_(self.norm1.weight)
        nn.init.ones_(self.norm2.weight)
        self.attn.init_weights()
        for lin in (self.mlp.w1, self.mlp.w2, self.mlp.w3, self.adaLN_modulation[-1]):
            lin.reset_parameters()
        if self.adaln_zero:
            nn.init.zeros_(self.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, s_max: torch.Tensor) -> torch.Tensor:
        """x [N, h, w, D], c [N, D], s_max [2] -> [N, h, w, D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        g_msa = gate_msa[:, None, None, :]                                          # (N, 1, 1, D)
        g_mlp = gate_mlp[:, None, None, :]
        x = x + g_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), s_max)
        x = x + g_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def resolve_smax(s_max, depth: int, device) -> torch.Tensor:
    """None / float / [2] / [depth, 2] -> a fp32 [depth, 2] tensor of per-block (x, y) S_max values."""
    if s_max is None or isinstance(s_max, (int, float)):
        # Filled on the device: a host tensor copied over would be a blocking copy (a stream sync) every forward.
        return torch.full((depth, 2), float(TRAIN_SMAX if s_max is None else s_max), dtype=torch.float32, device=device)
    if not torch.is_tensor(s_max):
        s_max = torch.tensor(s_max, dtype=torch.float32)
    s_max = s_max.to(device=device, dtype=torch.float32)
    if s_max.dim() == 0:
        return s_max.expand(depth, 2)
    if s_max.shape == (2,):
        return s_max.expand(depth, 2)
    if s_max.shape == (depth, 2):
        return s_max
    raise ValueError(f"s_max must be a scalar, [2] or [depth={depth}, 2], got shape {tuple(s_max.shape)}")


class FlowDCN(FlowBackbone):
    """FlowDCN velocity model: forward(x [N,C,H,W], t [N], y [N], s_max=None) -> v [N,C,H,W]."""

    def __init__(self, cfg: FlowDCNConfig):
        super().__init__(cfg, FlowDCNBlock)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s_max=None) -> torch.Tensor:
        N, _, H, W = x.shape
        x = self.x_embedder(x)                                                     # (N, h, w, D)
        c = self.t_embedder(t) + self.y_embedder(y)                                # (N, D)
        s_max = resolve_smax(s_max, len(self.blocks), x.device)                    # (depth, 2)
        for i, block in enumerate(self.blocks):
            x = block(x, c, s_max[i])                                              # (N, h, w, D)
        x = self.final_layer(x, c)                                                 # (N, h, w, p*p*C_out)
        x = unpatchify(x, self.patch_size, self.out_channels)                      # (N, C_out, H, W)
        return self.velocity(x)                                                    # (N, C, H, W)
