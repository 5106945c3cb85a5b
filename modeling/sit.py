"""SiT/DiT baseline with the same sizes as FlowDCN: attention through F.scaled_dot_product_attention.

Used to compare like for like in benchmarks. Position information comes from a 2-D sin-cos
embedding computed for the actual token grid, so any H×W divisible by the patch size works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FlowBackbone, modulate, sincos_pos_embed_2d, unpatchify


@dataclass
class SiTConfig:
    """SiT hyper-parameters (DiT/SiT defaults: adaLN-Zero, GELU-tanh MLP, qkv with bias)."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = False


class Attention(nn.Module):
    """Multi-head self-attention over the flattened token grid (flash/efficient SDPA kernels when available)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                                    # (N, heads, T, d)
        x = F.scaled_dot_product_attention(q, k, v)                                # (N, heads, T, d)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))                       # (N, T, D)


class SiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        hidden = int(D * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, D))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=True))

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in (self.attn.qkv, self.attn.proj, self.mlp[0], self.mlp[2]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [N, T, D], c [N, D] -> [N, T, D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class SiT(FlowBackbone):
    """SiT velocity model with the FlowDCN interface: forward(x, t, y, s_max=None) (s_max is ignored)."""

    def __init__(self, cfg: SiTConfig):
        super().__init__(cfg, SiTBlock)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, s_max=None) -> torch.Tensor:
        N, _, H, W = x.shape
        x = self.x_embedder(x)                                                     # (N, h, w, D)
        _, h, w, D = x.shape
        x = x + sincos_pos_embed_2d(D, h, w, device=x.device, dtype=x.dtype)      # (N, h, w, D)
        x = x.reshape(N, h * w, D)                                                 # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)                                # (N, D)
        for block in self.blocks:
            x = block(x, c)                                                        # (N, T, D)
        x = self.final_layer(x, c).view(N, h, w, -1)                               # (N, h, w, p*p*C_out)
        return self.velocity(unpatchify(x, self.patch_size, self.out_channels))   # (N, C, H, W)
