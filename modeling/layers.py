"""Building blocks shared by FlowDCN and SiT: embedders, norms, MLPs, modulation, patchify and the final layer."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ConcatLinear(torch.autograd.Function):
    """y = x·cat(W₁…Wₙ)ᵀ + b as one GEMM that saves x and the Wᵢ, not the concatenated copy.

    Saving the copy (what F.linear(x, torch.cat(ws)) does) would keep it alive from forward to backward
    even where the Wᵢ themselves are freed in between (FSDP2 resharding, ZeRO-3 partitioning): +0.4 GiB per
    rank at XL. Backward concatenates again instead. Autocast is applied here by hand (the dtype a Linear
    would compute in), because backward runs outside the forward's autocast region.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        # Not torch.amp.is_autocast_available (for "meta"): dynamo in torch 2.11 cannot trace it and breaks every
        # block's graph around this Function (measured: 8 graphs per block, compiled XL step ~2x slower).
        autocast = dev != "meta" and torch.is_autocast_enabled(dev)
        dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
        xc = x.to(dt)
        ctx.save_for_backward(xc, *weights)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        with torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext():
            return F.linear(xc, torch.cat(weights).to(dt), None if bias is None else bias.to(dt))

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, *weights = ctx.saved_tensors
        w = torch.cat(weights).to(xc.dtype)                                   # (N, D)
        gy = gy.to(xc.dtype)
        gx = (gy @ w).to(ctx.x_dtype)                                         # (..., D)
        gy2, x2 = gy.reshape(-1, gy.shape[-1]), xc.reshape(-1, xc.shape[-1])  # (M, N), (M, D)
        gw = (gy2.t() @ x2).split([wi.shape[0] for wi in weights])           # (Nᵢ, D) each
        gb = gy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.has_bias else None
        return gx, gb, *(g.to(wi.dtype) for g, wi in zip(gw, weights))


def concat_linear(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] -> [..., ΣNᵢ]: the outputs of Linears with weights Wᵢ [Nᵢ, D] in one GEMM (bias [ΣNᵢ]/None).

    Narrow projections (FlowDCN's Δ/ŝ/weights: 288/144/144 columns at XL) leave most of a GEMM tile idle and
    cost a launch each, forward and backward; the parameters stay separate (official checkpoint layout).
    """
    return _ConcatLinear.apply(x, bias, *weights)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x·(1 + scale) + shift, broadcasting [N, D] conditions over the token axes."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(shape)) + shift.view(shape)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t ∈ [0, 1] (used as is, no ×1000) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[cos, sin] features of t (cos first, as in DiT/SiT/FlowDCN), computed in fp32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]                                    # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                # (N, dim)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))                      # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row: label ``num_classes`` is the null (unconditional) class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)                                             # (N, D)


class RMSNorm(nn.Module):
    """LLaMA-style RMSNorm: normalise in fp32, cast back, then scale (FlowDCN's order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x·rsqrt(mean(x²) + eps) in fp32 as one fused op (CUDA) instead of five elementwise kernels.
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return out.type_as(x) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x), no biases; hidden = int(2·int(mlp_ratio·D)/3) as in the official code."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    reads_child_params = ("w1", "w3")   # forward() reads their weights without calling them (see MultiScaleDCN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = concat_linear(x, [self.w1.weight, self.w3.weight]).chunk(2, dim=-1)   # (…, hidden) each
        return self.w2(F.silu(a) * b)


class PatchEmbed(nn.Module):
    """Conv patch embedding to a channels-last token grid [N, h, w, D]; no position embedding."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input height and width must be divisible by the patch size {p}, got {H}x{W}")
        return self.proj(x).permute(0, 2, 3, 1)                                   # (N, H/p, W/p, D)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[N, h, w, p·p·c] tokens (ordered pi, pj, c) -> images [N, c, h·p, w·p]; non-square grids included."""
    N, h, w, _ = x.shape
    p = patch_size
    x = x.reshape(N, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, channels, h * p, w * p)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) → adaLN shift/scale → Linear to p·p·out_channels (zero-initialised)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

    def init_weights(self) -> None:
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


def reset_linear(lin: nn.Linear) -> None:
    """PyTorch's default Linear init (kaiming-uniform a=√5, bias U(±1/√fan_in)); usable after to_empty()."""
    lin.reset_parameters()


def sincos_pos_embed_2d(dim: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D sin-cos position embedding for any h×w grid (MAE/DiT formula), [h, w, dim]."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                            torch.arange(w, dtype=torch.float64, device=device), indexing="ij")
    # DiT order: first half embeds the column (w) coordinate, second half the row (h) coordinate.
    ex = gx[..., None] * omega                                                     # (h, w, dim/4)
    ey = gy[..., None] * omega
    emb = torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], dim=-1)              # (h, w, dim)
    return emb.to(dtype)


class FlowBackbone(nn.Module):
    """Shared skeleton of FlowDCN and SiT: patch/timestep/label embedders, ``blocks``, ``final_layer``, init.

    Subclasses pass a block factory and write ``forward``. Built on ``meta``, nothing is initialised
    until ``init_weights()`` (after ``to_empty()``).
    """

    def __init__(self, cfg, make_block):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.patch_size = cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.blocks = nn.ModuleList(make_block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def velocity(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C_out, H, W] -> the velocity channels [N, C, H, W]: the learned-sigma half is unused. Not a view
        when there is nothing to drop (FSDP2 warns about view outputs of a wrapped module)."""
        return x if self.out_channels == self.in_channels else x[:, : self.in_channels].contiguous()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT/FlowDCN embedder init, each block's own init, zero final layer."""
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Timestep MLP: weights N(0, 0.02), biases keep PyTorch's default (official _basic_init is disabled).
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            lin.reset_parameters()
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for block in self.blocks:
            block.init_weights()
        self.final_layer.init_weights()
