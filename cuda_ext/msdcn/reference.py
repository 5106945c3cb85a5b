"""Pure-PyTorch reference of the MSDCN sampling op. This file *is* the spec of the op's semantics.

For every query pixel (b, h, w), group g and point k the op samples the group's value map
bilinearly at (w + off_x, h + off_y), in token-grid units, and sums the K samples weighted by
``weights[b, h, w, g, k]`` (not normalised). Each of the four bilinear corners that falls outside
the grid contributes zero (per-corner zero padding).

``rounding="floor"`` is the correct bilinear rule. ``rounding="trunc"`` reproduces the official
FlowDCN kernel, which takes ``int(x)`` (truncation toward zero) as the lower corner: for
x in (-2, 0) it extrapolates linearly with negative weights (row [1, 10, 100] at x = -0.5 gives
-3.5 instead of 0.5). Released checkpoints were trained with it; new training uses floor.

Coordinates are always computed in fp32 (fp64 when any input is fp64, for gradcheck), values are
accumulated in the same precision, and the result is returned in ``value.dtype``.
"""
from __future__ import annotations

import torch

ROUNDING_MODES = ("floor", "trunc")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64 (exact checks), else fp32 (never bf16 coordinates)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_value_weights(op: str, value: torch.Tensor, weights: torch.Tensor, rounding: str) -> tuple[int, ...]:
    """The checks both ops share; returns (B, H, W, G, K)."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{op}: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if value.dim() != 5:
        raise ValueError(f"{op}: value must be [B,H,W,G,C], got shape {tuple(value.shape)}")
    B, H, W, G, _ = value.shape
    if weights.dim() != 5 or tuple(weights.shape[:4]) != (B, H, W, G):
        raise ValueError(f"{op}: weights must be [B,H,W,G,K]=[{B},{H},{W},{G},K], got {tuple(weights.shape)}")
    if weights.device != value.device:
        raise ValueError(f"{op}: weights is on {weights.device} but value is on {value.device}")
    return B, H, W, G, weights.shape[4]


def _check_shapes(op: str, value: torch.Tensor, expect: dict) -> None:
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {tuple(t.shape)}")


def check_msdcn_inputs(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str) -> None:
    """Raise a clear error naming the offending argument when shapes or modes do not match the contract."""
    B, H, W, G, K = _check_value_weights("msdcn", value, weights, rounding)
    _check_shapes("msdcn", value, {"offsets": (offsets, (B, H, W, G, K, 2))})
    if offsets.device != value.device:
        raise ValueError(f"msdcn: offsets is on {offsets.device} but value is on {value.device}")


def check_deform_inputs(value, delta, scale_logit, weights, prior, s0, s_max, rounding: str) -> None:
    """The same for the fused op (msdcn_deform), naming the argument whose shape or device is wrong."""
    B, H, W, G, K = _check_value_weights("msdcn_deform", value, weights, rounding)
    _check_shapes("msdcn_deform", value, {
        "delta": (delta, (B, H, W, G, K, 2)), "scale_logit": (scale_logit, (B, H, W, G, K)),
        "prior": (prior, (K, 2)), "s0": (s0, (G,)), "s_max": (s_max, (2,)),
    })
    for name, t in (("delta", delta), ("scale_logit", scale_logit)):
        if t.device != value.device:
            raise ValueError(f"msdcn_deform: {name} is on {t.device} but value is on {value.device}")


def packed_channels(proj: torch.Tensor, groups: int, points: int) -> int:
    """C of a packed projection proj [B,H,W,G*C + 4*G*K] (see split_packed); a ValueError naming proj when its shape
    does not fit G and K."""
    G, K = int(groups), int(points)
    if G < 1 or K < 1:
        raise ValueError(f"msdcn_deform_packed: groups and points must be >= 1, got {G} and {K}")
    if proj.dim() != 4:
        raise ValueError(f"msdcn_deform_packed: proj must be [B,H,W,G*C+4*G*K], got shape {tuple(proj.shape)}")
    R = proj.shape[-1]
    GC = R - 4 * G * K
    if GC < G or GC % G:
        raise ValueError(f"msdcn_deform_packed: proj's last dimension {R} is not G*C + 4*G*K for G={G}, K={K} and a whole C >= 1")
    return GC // G


def check_packed_inputs(proj, prior, s0, s_max, groups: int, points: int, rounding: str) -> int:
    """msdcn_deform_packed's checks without building the four views (the CUDA path reads proj in place): returns C."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"msdcn_deform_packed: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    C = packed_channels(proj, groups, points)
    _check_shapes("msdcn_deform_packed", proj, {"prior": (prior, (points, 2)), "s0": (s0, (groups,)), "s_max": (s_max, (2,))})
    return C


def split_packed(proj: torch.Tensor, groups: int, points: int):
    """Views (value, delta, scale_logit, weights) of a packed projection proj [B,H,W,G*C + 4*G*K]: each pixel's row is
    value (G*C, ordered (g, c)) | delta (2*G*K, (g, k, xy)) | scale_logit (G*K) | weights (G*K), one GEMM's output.
    Raises a ValueError naming proj when its last dimension is not G*C + 4*G*K for a whole C >= 1."""
    G, K = int(groups), int(points)
    C = packed_channels(proj, G, K)
    GK = G * K
    value, delta, scale, weights = proj.split([G * C, 2 * GK, GK, GK], dim=-1)
    return (value.unflatten(-1, (G, C)), delta.unflatten(-1, (G, K, 2)), scale.unflatten(-1, (G, K)),
            weights.unflatten(-1, (G, K)))


def _corners(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str):
    """Shared corner geometry of forward and backward.

    Returns (v, wk, corners): v [B*G*H*W, C] in the compute dtype with rows ordered (b, g, h, w),
    wk the weights in the compute dtype, and for each of the 4 corners a tuple
    (rows, bil, dbil_dx, dbil_dy, valid) of [B,H,W,G,K] tensors.
    """
    B, H, W, G, C = value.shape
    cdt = compute_dtype(value, offsets, weights)
    dev = value.device
    # Sample positions in token-grid units: x = column + off_x, y = row + off_y.   # (B, H, W, G, K)
    off = offsets.to(cdt)
    px = torch.arange(W, device=dev, dtype=cdt).view(1, 1, W, 1, 1) + off[..., 0]
    py = torch.arange(H, device=dev, dtype=cdt).view(1, H, 1, 1, 1) + off[..., 1]
    rnd = torch.floor if rounding == "floor" else torch.trunc
    x0, y0 = rnd(px), rnd(py)
    lx, ly = px - x0, py - y0          # fractional parts (negative under trunc for px < 0)
    hx, hy = 1 - lx, 1 - ly
    x0, y0 = x0.long(), y0.long()
    # Flatten (b, g) into the row index so one index_select serves every corner.
    v = value.to(cdt).permute(0, 3, 1, 2, 4).reshape(B * G * H * W, C)
    bg = (torch.arange(B, device=dev).view(B, 1, 1, 1, 1) * G + torch.arange(G, device=dev).view(1, 1, 1, G, 1)) * (H * W)
    corners = []
    #            dx dy  bilinear weight  d/dx    d/dy
    for dx, dy, bil, ddx, ddy in ((0, 0, hx * hy, -hy, -hx), (1, 0, lx * hy, hy, -lx), (0, 1, hx * ly, -ly, hx), (1, 1, lx * ly, ly, lx)):
        xi, yi = x0 + dx, y0 + dy
        valid = ((xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)).to(cdt)
        rows = bg + yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)
        corners.append((rows, bil, ddx, ddy, valid))
    return v, weights.to(cdt), corners


def msdcn_ref(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """Reference MSDCN: explicit four-corner gather, differentiable by autograd, any device and dtype."""
    check_msdcn_inputs(value, offsets, weights, rounding)
    B, H, W, G, C = value.shape
    K = weights.shape[-1]
    v, wk, corners = _corners(value, offsets, weights, rounding)
    out = None
    for rows, bil, _, _, valid in corners:
        sampled = v.index_select(0, rows.reshape(-1)).view(B, H, W, G, K, C)        # (B, H, W, G, K, C)
        term = (sampled * (bil * wk * valid).unsqueeze(-1)).sum(dim=4)             # (B, H, W, G, C)
        out = term if out is None else out + term
    return out.to(value.dtype)


def msdcn_ref_backward(
    grad_out: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str = "floor"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit gradients of msdcn_ref w.r.t. (value, offsets, weights), each in its input's dtype.

    d value:   scatter of w_k * bil_corner * g into the corner's row (index_add, compute dtype).
    d weights: sum over corners of bil_corner * <v_corner, g>.
    d off_x:   w_k * sum over corners of d bil_corner / dx * <v_corner, g>   (likewise y).
    The derivative of floor/trunc is taken as zero, as in the kernels.
    """
    B, H, W, G, C = value.shape
    K = weights.shape[-1]
    v, wk, corners = _corners(value, offsets, weights, rounding)
    g = grad_out.to(v.dtype).unsqueeze(4)                                          # (B, H, W, G, 1, C)
    gv = torch.zeros_like(v)
    gw = torch.zeros_like(wk)
    gx = torch.zeros_like(wk)
    gy = torch.zeros_like(wk)
    for rows, bil, ddx, ddy, valid in corners:
        flat = rows.reshape(-1)
        dot = (v.index_select(0, flat).view(B, H, W, G, K, C) * g).sum(-1) * valid  # (B, H, W, G, K)
        gw = gw + bil * dot
        gx = gx + ddx * dot
        gy = gy + ddy * dot
        contrib = (g * (wk * bil * valid).unsqueeze(-1)).reshape(-1, C)               # (B*H*W*G*K, C)
        gv.index_add_(0, flat, contrib)
    grad_value = gv.view(B, G, H, W, C).permute(0, 2, 3, 1, 4).to(value.dtype)
    grad_offsets = (torch.stack([gx, gy], -1) * wk.unsqueeze(-1)).to(offsets.dtype)
    return grad_value.contiguous(), grad_offsets, gw.to(weights.dtype)


def deform_offsets_ref(
    delta: torch.Tensor,
    scale_logit: torch.Tensor,
    prior: torch.Tensor,
    s0: torch.Tensor,
    s_max: torch.Tensor,
) -> torch.Tensor:
    """FlowDCN's deformable field in fp32: off = (delta + prior) * sigmoid(scale_logit + s0) * S_max[axis].

    delta [B,H,W,G,K,2], scale_logit [B,H,W,G,K] (projection output, without s0), prior [K,2],
    s0 [G] (per-group scale logits), s_max [2] as (x, y). Returns offsets [B,H,W,G,K,2] fp32.
    """
    cdt = compute_dtype(delta, scale_logit, s_max)
    scale = torch.sigmoid(scale_logit.to(cdt) + s0.to(cdt).view(-1, 1))            # (B, H, W, G, K)
    return (delta.to(cdt) + prior.to(cdt)) * scale.unsqueeze(-1) * s_max.to(cdt)   # (B, H, W, G, K, 2)


def msdcn_grid_sample_ref(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Independent floor-semantics reference through F.grid_sample(align_corners=True, zeros padding)."""
    B, H, W, G, C = value.shape
    K = weights.shape[-1]
    cdt = compute_dtype(value, offsets, weights)
    v = value.to(cdt).permute(0, 3, 4, 1, 2).reshape(B * G, C, H, W)
    px = torch.arange(W, device=value.device, dtype=cdt).view(1, 1, W, 1, 1) + offsets[..., 0].to(cdt)
    py = torch.arange(H, device=value.device, dtype=cdt).view(1, H, 1, 1, 1) + offsets[..., 1].to(cdt)
    # align_corners=True maps -1 -> pixel 0 and +1 -> pixel W-1.
    if H < 2 or W < 2:
        raise ValueError("msdcn_grid_sample_ref needs H, W >= 2 (align_corners=True normalisation)")
    gx, gy = 2 * px / (W - 1) - 1, 2 * py / (H - 1) - 1
    grid = torch.stack([gx, gy], -1).permute(0, 3, 1, 2, 4, 5).reshape(B * G, H, W * K, 2)
    s = torch.nn.functional.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    s = s.view(B, G, C, H, W, K)
    out = (s * weights.to(cdt).permute(0, 3, 1, 2, 4).unsqueeze(2)).sum(-1)     # (B, G, C, H, W)
    return out.permute(0, 3, 4, 1, 2).to(value.dtype)
