"""CUDA backend of the MSDCN op: the JIT-compiled kernels of csrc/ as torch.library operators.

Ops (each with a fake impl, so torch.compile(fullgraph=True) traces through without a graph break;
eager calls run the same implementations through a thin autograd.Function, which costs less Python):
  flowdcn::msdcn_cuda(value, offsets, weights, rounding)                                  -> out
  flowdcn::msdcn_cuda_backward(grad_out, value, offsets, weights, rounding)               -> (g_value, g_offsets, g_weights)
  flowdcn::msdcn_deform_cuda(value, delta, scale_logit, weights, prior, s0, s_max, rounding) -> out
  flowdcn::msdcn_deform_cuda_backward(grad_out, ...same inputs...)  -> (g_value, g_delta, g_scale_logit, g_weights, g_s0)
  flowdcn::msdcn_deform_packed_cuda(proj, prior, s0, s_max, groups, channels, points, rounding)  -> out
  flowdcn::msdcn_deform_packed_cuda_train(...same inputs...)  -> (out, bucketing for the backward)
  flowdcn::msdcn_deform_packed_cuda_backward(grad_out, ...same inputs..., bucketing or None)      -> (g_proj, g_s0)

Dtypes are taken as they come (autocast gives bf16 value and fields): value bf16/fp16/fp32/fp64, fields
of the value's dtype or fp32 (other mixes are cast to fp32 here). Coordinates and sums are fp32 (fp64
for fp64 values), grad_value is summed in fp32 (registers of the gather backward, or an fp32 atomic
buffer), every grad is returned in its input's dtype. C need not be a multiple of 8: other C are
zero-padded here (a copy; C % 8 == 0 is the fast path).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from . import build
from .reference import check_deform_inputs, check_msdcn_inputs, check_packed_inputs, split_packed

__all__ = ["available", "require", "supports", "msdcn", "msdcn_deform", "msdcn_deform_packed", "packed_served", "set_backward",
           "set_launch", "set_tiled"]

_VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_state: dict[str, object] = {"error": None, "ok": False}
# Launch shape: threads per block aimed at (a block holds whole (query, group) sets) and rounds of
# queries per block (consecutive queries share corners, later rounds hit L1); tuned by bench/msdcn_op.py.
_LAUNCH = {
    "forward": [int(os.environ.get("FLOWDCN_MSDCN_THREADS_FWD", "128")), int(os.environ.get("FLOWDCN_MSDCN_ROUNDS_FWD", "2"))],
    "backward": [int(os.environ.get("FLOWDCN_MSDCN_THREADS_BWD", "256")), int(os.environ.get("FLOWDCN_MSDCN_ROUNDS_BWD", "1"))],
}
# Backward channel layout: two 4-channel runs per thread, at lane*4 and C/2 + lane*4 (True), or 8 in a row.
_SPLIT_BWD = os.environ.get("FLOWDCN_MSDCN_SPLIT_BWD", "1") == "1"
# Backward kernel capped at 85 registers (3 blocks of <= 256 threads per SM) instead of 128.
_LEAN_BWD = os.environ.get("FLOWDCN_MSDCN_LEAN_BWD", "1") == "1"
# Backward: ask the driver for just the shared memory the resident blocks need (more L1 for the gathers).
_L1_PREF_BWD = os.environ.get("FLOWDCN_MSDCN_L1_PREF_BWD", "1") == "1"
# Tiled backward (csrc/msdcn_tiled.cuh): a block accumulates grad_value of a tile of queries of one group
# in a shared-memory window (tile + halo radius) and flushes it once, instead of one global atomic per
# (query, point, corner). Tile "HxW" queries; halo radius in pixels (lowered by the launcher only when the
# block's shared memory would not fit; at XL, 8x8 tiles fit two blocks per SM up to radius 2). Mode "sort" buckets the window's contributions by pixel (no float shared atomics), "atomic" adds
# them with shared-memory atomicAdd (a CAS loop on sm_90).
_TILED_BWD = os.environ.get("FLOWDCN_MSDCN_TILED_BWD", "0") == "1"
_TILED_MODES = {"atomic": 1, "sort": 2}
_TILED_MODE = os.environ.get("FLOWDCN_MSDCN_TILED_MODE", "sort")
if _TILED_MODE not in _TILED_MODES:
    raise ValueError(f"FLOWDCN_MSDCN_TILED_MODE must be one of {sorted(_TILED_MODES)}, got {_TILED_MODE!r}")
_TILE = [int(x) for x in os.environ.get("FLOWDCN_MSDCN_TILE", "8x8").lower().split("x")]
_TILE_RADIUS = int(os.environ.get("FLOWDCN_MSDCN_TILE_RADIUS", "2"))
# Backward algorithm: "gather" (csrc/msdcn_gather.cuh) buckets the sampling points by grid cell (an integer
# counting sort), then sums each pixel's grad_value in registers from the four cells it is a corner of, taking
# the corner dots in the same pass; "scatter" adds every contribution to an fp32 buffer with float atomics
# (msdcn_backward_kernel; also where the gather one does not serve a shape: C > 256, G*K > 1024, > 2^31 slots).
# Measured on an H200, XL fwd+bwd 1.55 vs 2.34 ms at 32^2 (bench/RESULTS.md). The tiled backward (a scatter
# variant, off by default) takes precedence when switched on.
# With "gather" selected, small grids take the plane kernels instead (csrc/msdcn_plane.cuh: one block per (image, group)
# with the group's value and grad_out planes in shared memory; forward and backward) wherever their shared memory fits and
# there are at least half as many (image, group) blocks as SMs: XL 16^2 fwd+bwd 0.245 vs 0.356 ms on an H200.
# FLOWDCN_MSDCN_PLANE=on (default) | off | fwd | bwd | force (also below the block-count rule) is read on every call
# (under torch.compile, at trace time).
_BACKWARDS = ("gather", "scatter")
_BACKWARD = os.environ.get("FLOWDCN_MSDCN_BWD", "gather")
if _BACKWARD not in _BACKWARDS:
    raise ValueError(f"FLOWDCN_MSDCN_BWD must be one of {_BACKWARDS}, got {_BACKWARD!r}")
# Benchmark diagnostic only: the scatter backward leaves grad_value zero (to measure the atomics' share).
_DIAG_SKIP_VALUE_GRAD = False


def set_launch(phase: str, threads: int | None = None, rounds: int | None = None) -> None:
    """Set the threads-per-block target (1..512) and rounds per block (>= 1) of the 'forward' or 'backward' launch."""
    if phase not in _LAUNCH:
        raise ValueError(f"msdcn cuda: phase must be 'forward' or 'backward', got {phase!r}")
    if threads is not None:
        if not 1 <= int(threads) <= 512:
            raise ValueError(f"msdcn cuda: threads per block must be in [1, 512], got {threads}")
        _LAUNCH[phase][0] = int(threads)
    if rounds is not None:
        if int(rounds) < 1:
            raise ValueError(f"msdcn cuda: rounds per block must be >= 1, got {rounds}")
        _LAUNCH[phase][1] = int(rounds)


_LOADED: dict[int, object] = {}


def _module(device: torch.device | None = None):
    """The compiled extension for ``device`` (built on first use, then a dict lookup per call)."""
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    mod = _LOADED.get(index)
    if mod is None:
        mod = _LOADED[index] = build.load(index)
        _PLANE_LIMITS[index] = tuple(mod.device_limits(index))   # for _plane_backward_serves
    return mod


def require() -> None:
    """Raise RuntimeError naming what is missing (no GPU, no nvcc, compile error and its log) unless the kernels load."""
    if _state.get("ok"):
        return  # checked once per process: the model calls this on every forward
    if _state["error"] is not None:
        raise RuntimeError(_state["error"])
    try:
        build.check_prerequisites()
        _module()
    except Exception as exc:  # remember the reason: "auto" must not retry a failing build on every call
        _state["error"] = str(exc)
        if torch.version.cuda is not None and torch.cuda.is_available():
            # A GPU is there but the kernels are not: say so once, since impl="auto" falls back to the reference.
            warnings.warn(f"MSDCN CUDA kernels unavailable, impl='auto' uses the PyTorch reference: {exc}", RuntimeWarning, stacklevel=2)
        raise RuntimeError(str(exc)) from exc
    _state["ok"] = True


def available() -> bool:
    """True when a CUDA device is present and the extension builds or is cached; never raises."""
    try:
        require()
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- input preparation
def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a 16-byte aligned base address (the kernels use 16-byte vector accesses)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _acc_dtype(value: torch.Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _field_dtype(value: torch.Tensor, *fields: torch.Tensor) -> torch.dtype:
    """Fields stay in their dtype when it equals a bf16/fp16 value's (autocast); otherwise fp32 (fp64 for fp64)."""
    if value.dtype == torch.float64:
        return torch.float64
    if value.dtype in (torch.bfloat16, torch.float16) and all(f.dtype == value.dtype for f in fields):
        return value.dtype
    return torch.float32


def supports(shape) -> bool:
    """True when the kernels take value of this [B,H,W,G,C] shape: G * ceil(C/8) <= 512 (a block holds whole queries)."""
    return shape[-2] * ((shape[-1] + 7) // 8) <= 512


def _prep_value(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Aligned value, zero-padded to a multiple of 8 channels; returns (value, original C)."""
    if value.dtype not in _VALUE_DTYPES:
        raise TypeError(f"msdcn cuda: value dtype must be one of {_VALUE_DTYPES}, got {value.dtype}")
    if not value.is_cuda:
        raise ValueError(f"msdcn cuda: value must be a CUDA tensor, got device {value.device}")
    if not supports(value.shape):
        raise ValueError(f"msdcn cuda: G * ceil(C/8) must be <= 512, got G={value.shape[-2]}, C={value.shape[-1]}; use impl='torch'")
    C = value.shape[-1]
    pad = (-C) % 8
    if pad:
        value = F.pad(value, (0, pad))
    return _aligned(value), C


def _prep_grad(grad_out: torch.Tensor, value: torch.Tensor, pad: int) -> torch.Tensor:
    """grad_out in value's dtype, padded like value, aligned."""
    g = grad_out if grad_out.dtype == value.dtype else grad_out.to(value.dtype)
    if pad:
        g = F.pad(g, (0, pad))
    return _aligned(g)


def _fields(value: torch.Tensor, *fields: torch.Tensor) -> list[torch.Tensor]:
    """Offsets/delta, scale_logit and weights in one field dtype (see _field_dtype), contiguous."""
    fdt = _field_dtype(value, *fields)
    return [(f if f.dtype == fdt else f.to(fdt)).contiguous() for f in fields]


def _consts(value: torch.Tensor, *consts: torch.Tensor) -> list[torch.Tensor]:
    """prior, s0, s_max in the accumulation dtype on value's device (tiny; the device guard is in C++)."""
    adt = _acc_dtype(value)
    return [c if (c.dtype == adt and c.device == value.device and c.is_contiguous()) else c.detach().to(device=value.device, dtype=adt).contiguous()
            for c in consts]


def _empty(value: torch.Tensor) -> torch.Tensor:
    """Placeholder for the tensors the plain (unfused) kernels do not read."""
    return torch.empty(0, device=value.device, dtype=_acc_dtype(value))


# ---------------------------------------------------------------- implementations (shared by both paths)
def _plain_forward(value, offsets, weights, rounding):
    """out = msdcn(value, offsets, weights) through the forward kernel."""
    v, C = _prep_value(value)
    off, w = _fields(v, offsets, weights)
    e = _empty(v)
    out = _module(v.device).forward(v, off, e, w, e, e, e, False, rounding == "trunc", *_LAUNCH["forward"])
    return out[..., :C].contiguous() if out.shape[-1] != C else out   # the fake impl promises a contiguous output


def set_tiled(enabled: bool, tile: tuple[int, int] | None = None, radius: int | None = None, mode: str | None = None) -> None:
    """Switch the tiled backward on/off; tile = (height, width) in queries, radius = halo in pixels, mode 'sort'|'atomic'."""
    global _TILED_BWD, _TILE_RADIUS, _TILED_MODE
    if mode is not None:
        if mode not in _TILED_MODES:
            raise ValueError(f"msdcn cuda: tiled mode must be one of {sorted(_TILED_MODES)}, got {mode!r}")
        _TILED_MODE = mode
    if tile is not None:
        th, tw = (int(x) for x in tile)
        if th < 1 or tw < 1 or th * tw > 4096:
            raise ValueError(f"msdcn cuda: tile must be >= 1x1 and at most 4096 queries, got {tile}")
        _TILE[:] = [th, tw]
    if radius is not None:
        if not 0 <= int(radius) <= 64:
            raise ValueError(f"msdcn cuda: tile radius must be in [0, 64], got {radius}")
        _TILE_RADIUS = int(radius)
    _TILED_BWD = bool(enabled)


def set_backward(kind: str) -> None:
    """Choose the backward algorithm: 'gather' (default) or 'scatter' (see FLOWDCN_MSDCN_BWD)."""
    global _BACKWARD
    if kind not in _BACKWARDS:
        raise ValueError(f"msdcn cuda: backward must be one of {_BACKWARDS}, got {kind!r}")
    _BACKWARD = kind


_PULL_RUNS = ("auto", "1", "2", "3", "4")


def _pull_runs(C: int) -> int:
    """Runs of 8 channels per lane of the gather backward's pull (csrc/msdcn_gather.cuh pull_runs), 0 = the launcher's
    choice (the first of 3, 4, 2, 1 that divides C/8; 1 for fp64). FLOWDCN_MSDCN_PULL_VEC=auto|1|2|3|4 is a benchmark
    switch, read on every call."""
    v = os.environ.get("FLOWDCN_MSDCN_PULL_VEC", "auto")
    if v not in _PULL_RUNS:
        raise ValueError(f"FLOWDCN_MSDCN_PULL_VEC must be one of {_PULL_RUNS}, got {v!r}")
    if v == "auto":
        return 0
    n = int(v)
    if (C // 8) % n:
        raise ValueError(f"FLOWDCN_MSDCN_PULL_VEC={n} must divide C/8 = {C // 8} (C={C}): use auto or a divisor")
    return n


def _bwd_flags(C: int):
    """Launch shape and variant of the backward (0 scatter, 1/2 tiled scatter, 3 gather; see msdcn_cuda.cu), for C channels."""
    if _TILED_BWD:
        variant = _TILED_MODES[_TILED_MODE]
    else:
        variant = 3 if _BACKWARD == "gather" else 0
    # The pull width matters (and is checked) only where the gather backward serves C (C/8 <= 32; csrc gather_serves).
    vec = _pull_runs(C) if variant == 3 and C // 8 <= 32 else 0
    return (*_LAUNCH["backward"], _SPLIT_BWD, _LEAN_BWD, _L1_PREF_BWD, _DIAG_SKIP_VALUE_GRAD, variant, *_TILE, _TILE_RADIUS, vec)


def _finish(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A kernel's grad in the dtype of the input it belongs to (no call when it already is)."""
    return grad if grad.dtype == dtype else grad.to(dtype)


def _grad_value(gv: torch.Tensor, dtype: torch.dtype, C: int) -> torch.Tensor:
    """grad_value in value's dtype and channels (the scatter buffer is fp32; padded channels are dropped)."""
    if gv.shape[-1] != C:
        gv = gv[..., :C].contiguous()
    return _finish(gv, dtype)


def _plain_backward_impl(grad_out, value, offsets, weights, rounding):
    """(grad_value, grad_offsets, grad_weights), each in its input's dtype."""
    v, C = _prep_value(value)
    off, w = _fields(v, offsets, weights)
    g = _prep_grad(grad_out, v, v.shape[-1] - C)
    e = _empty(v)
    gv, goff, _, gw, _ = _module(v.device).backward(g, v, off, e, w, e, e, e, False, rounding == "trunc", *_bwd_flags(v.shape[-1]))
    return _grad_value(gv, value.dtype, C), _finish(goff, offsets.dtype), _finish(gw, weights.dtype)


def _deform_prep(value, delta, scale_logit, weights, prior, s0, s_max):
    """The fused op's inputs as the kernels take them: (v, C, delta, scale_logit, weights, prior, s0, s_max)."""
    v, C = _prep_value(value)
    return (v, C, *_fields(v, delta, scale_logit, weights), *_consts(v, prior, s0, s_max))


def _deform_forward_prepped(v, C, d, s, w, p, z, m, rounding):
    """The forward kernel on prepared inputs (_deform_prep), sliced back to C channels."""
    out = _module(v.device).forward(v, d, s, w, p, z, m, True, rounding == "trunc", *_LAUNCH["forward"])
    return out[..., :C].contiguous() if out.shape[-1] != C else out   # the fake impl promises a contiguous output


def _deform_forward(value, delta, scale_logit, weights, prior, s0, s_max, rounding):
    """out = msdcn(value, (delta + prior)·σ(scale_logit + s0)·S_max, weights), the field computed in the kernel."""
    return _deform_forward_prepped(*_deform_prep(value, delta, scale_logit, weights, prior, s0, s_max), rounding)


def _deform_backward_prepped(grad_out, v, C, d, s, w, p, z, m, rounding):
    """Backward kernels on prepared inputs (_deform_prep): (g_value, g_delta, g_scale_logit, g_weights, g_s0) as the
    launcher returns them (g_value fp32 from the scatter kernel, g_s0 in the accumulation dtype)."""
    g = _prep_grad(grad_out, v, v.shape[-1] - C)
    return _module(v.device).backward(g, v, d, s, w, p, z, m, True, rounding == "trunc", *_bwd_flags(v.shape[-1]))


def _deform_backward_impl(grad_out, value, delta, scale_logit, weights, prior, s0, s_max, rounding):
    """(grad_value, grad_delta, grad_scale_logit, grad_weights, grad_s0), each in its input's dtype."""
    prepped = _deform_prep(value, delta, scale_logit, weights, prior, s0, s_max)
    gv, gd, gs, gw, gs0 = _deform_backward_prepped(grad_out, *prepped, rounding)
    return (_grad_value(gv, value.dtype, prepped[1]), _finish(gd, delta.dtype), _finish(gs, scale_logit.dtype),
            _finish(gw, weights.dtype), _s0_grad(gs0, s0.dtype, s0.device))


def _s0_grad(gs0: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """d/ds0 ([G], accumulation dtype, value's device) in s0's dtype and on s0's device."""
    return gs0 if (gs0.dtype == dtype and gs0.device == device) else gs0.to(device=device, dtype=dtype)


# ---------------------------------------------------------------- the packed projection
# proj [B,H,W,G*C + 4*G*K] (value | delta | scale_logit | weights per pixel; reference.split_packed) is one GEMM's output.
# The packed kernels read it in place at its row stride and write its grad in place: no split copies forward, no
# concatenation of the four grads backward (the GEMM's backward takes the one grad tensor as it is).
_INT31 = (1 << 31) - 1


def packed_served(shape, groups: int, points: int, dtype: torch.dtype) -> bool:
    """True when the packed kernels take proj of this [B,H,W,R] shape and dtype: the gather backward is selected (not
    the scatter or tiled one) and serves the shape (C/8 <= 32, G*K <= 1024, corner slots and buckets in int32), C is a
    multiple of 8 and rows are 16-byte multiples. Otherwise msdcn_deform_packed takes the unpacked op (copies)."""
    B, H, W, R = shape
    G, K = groups, points
    C = (R - 4 * G * K) // G
    itemsize = dtype.itemsize
    return (_BACKWARD == "gather" and not _TILED_BWD and dtype in _VALUE_DTYPES and K >= 1 and C % 8 == 0 and C // 8 <= 32
            and G * (C // 8) <= 512 and G * K <= 1024 and (R * itemsize) % 16 == 0 and B * H * W * G * K * 4 < _INT31
            and B * (H + 1) * (W + 1) * G < _INT31)


def _packed_prep(proj, prior, s0, s_max):
    """(proj aligned, prior, s0, s_max in the accumulation dtype on proj's device)."""
    return (_aligned(proj), *_consts(proj, prior, s0, s_max))


def _packed_forward_prepped(proj, p, z, m, groups, channels, points, rounding):
    return _module(proj.device).forward_packed(proj, p, z, m, groups, channels, points, rounding == "trunc", *_LAUNCH["forward"])


def _packed_forward(proj, prior, s0, s_max, groups, channels, points, rounding):
    """out [B,H,W,G,C] = msdcn_deform of proj's four parts, read in place."""
    return _packed_forward_prepped(*_packed_prep(proj, prior, s0, s_max), groups, channels, points, rounding)


def _packed_forward_train_prepped(proj, p, z, m, groups, channels, points, rounding):
    """(out, bucketing): the forward kernel also buckets the sampling points for the gather backward (int32, 8 bytes per
    point kept until backward), which then skips its count kernel."""
    return tuple(_module(proj.device).forward_packed_train(proj, p, z, m, groups, channels, points, rounding == "trunc",
                                                           *_LAUNCH["forward"]))


def _packed_forward_train(proj, prior, s0, s_max, groups, channels, points, rounding):
    return _packed_forward_train_prepped(*_packed_prep(proj, prior, s0, s_max), groups, channels, points, rounding)


def _packed_backward_prepped(grad_out, proj, p, z, m, groups, channels, points, rounding, counts=None):
    """(g_proj in proj's dtype and layout, g_s0 [G] in the accumulation dtype) from the gather backward; counts: the
    training forward's bucketing, or None (then the backward counts)."""
    g = _aligned(grad_out if grad_out.dtype == proj.dtype else grad_out.to(proj.dtype))
    if counts is None:
        counts = torch.empty(0, dtype=torch.int32, device=proj.device)
    return _module(proj.device).backward_packed(g, proj, p, z, m, groups, channels, points, rounding == "trunc", _pull_runs(channels),
                                                counts)


def _packed_backward_impl(grad_out, proj, prior, s0, s_max, groups, channels, points, rounding, counts=None):
    gp, gs0 = _packed_backward_prepped(grad_out, *_packed_prep(proj, prior, s0, s_max), groups, channels, points, rounding, counts)
    return gp, _s0_grad(gs0, s0.dtype, s0.device)


# Per CUDA device: (shared memory per block, opt-in; streaming multiprocessors), recorded when the extension loads for it.
_PLANE_LIMITS: dict[int, tuple[int, int]] = {}


def _plane_backward_bytes(H, W, C: int, K: int, itemsize: int, accsize: int):
    """Shared memory of a plane-backward block (csrc/msdcn_plane.cuh plane_layout, backward), from shape arithmetic only:
    torch.compile traces it with static or symbolic H, W (tests/cuda_ext: it equals the extension's rule on a GPU)."""
    per_unit = 16 // itemsize
    units = C // per_unit
    rs = (units + 1 if units % 2 == 0 else units) * per_unit   # plane row stride: an odd number of 16-byte units
    HW, P, cells = H * W, H * W * K, (H + 1) * (W + 1)
    rsu = rs * itemsize // 16
    ys = W * rs + (3 - W % 8 + 8) * rsu % 8 * per_unit   # image rows padded apart in bank quads (plane_image_row_pad)

    def a16(n):
        return (n + 15) // 16 * 16

    # the value plane has one more row, of zeros (the zero padding); its space later holds the pull's [P, 4] records.
    # The builtin max: torch.sym_max here made torch 2.11 (the H200 machine) break the compiled FlowDCN block's graph
    # (7 breaks in bench/train_step.py, a failing fullgraph test). The builtin max traced without breaks there (static
    # sizes), and with static and dynamic sizes under torch 2.13 on the CPU.
    return (a16(max((H * ys + rs) * itemsize, 4 * P * accsize)) + a16(HW * rs * itemsize) + a16(P * accsize) + a16(2 * P * accsize) + 2 * a16(2 * P) + a16(4 * (cells + 1))
            + a16(4 * cells) + a16(32 * accsize))


def _plane_backward_serves(proj: torch.Tensor, groups: int, channels: int, points: int) -> bool:
    """True when the plane backward (csrc/msdcn_plane.cuh: one block per (image, group), its planes in shared memory)
    takes this packed shape on proj's device; then the training forward need not bucket the points for the gather
    backward. The extension's rule (plane_serves: shared memory, 16-bit indices, at least half as many blocks as SMs,
    FLOWDCN_MSDCN_PLANE) in plain arithmetic on the shape, so torch.compile traces it with static and dynamic shapes
    (guards, no specialisation). Were the two rules ever to disagree, only speed would suffer: the C++ backward takes
    the plane kernels where they serve and ignores a bucketing, and counts for itself where it got none."""
    B, H, W, _ = proj.shape
    return _plane_rule(B, H, W, groups, channels, points, proj.dtype, proj.device.index)


def _plane_rule(B, H, W, G: int, C: int, K: int, dtype: torch.dtype, device: int | None) -> bool:
    """_plane_backward_serves on a value shape [B, H, W, G, C], K points, dtype, CUDA device index."""
    switch = os.environ.get("FLOWDCN_MSDCN_PLANE", "on")
    if switch in ("off", "fwd"):
        return False
    limits = _PLANE_LIMITS.get(device) if device is not None else None
    if limits is None or C % 8 or C <= 0:
        return False
    smem, sms = limits
    if (H + 1) * (W + 1) >= 4096 or H * W * K >= 65536 or H * W * K <= 0:   # 16-bit cells, FastDiv (plane_indices_fit)
        return False
    if switch != "force" and 2 * B * G < sms:
        return False
    return _plane_backward_bytes(H, W, C, K, dtype.itemsize, 8 if dtype == torch.float64 else 4) <= smem


def _bucketing_words(proj, groups, points) -> int:
    """Length of the training forward's bucketing (csrc gather_count_words): count per (cell, group) bucket, key and
    rank per sampling point."""
    B, H, W, _ = proj.shape
    return B * (H + 1) * (W + 1) * groups + 2 * B * H * W * groups * points


# ---------------------------------------------------------------- torch.library ops (what torch.compile sees)
# Registered through torch.library.Library (schema + CUDA kernel + fake + autograd), not torch.library.custom_op:
# custom_op wraps every call in Python checks (output aliasing, etc.), and the compiled graphs call these ops 56
# times per XL step. Under cProfile on the H200 machine that wrapper was the largest single Python item of the
# compiled FlowDCN step (bench/profile_step.py --python); on the 2-core CPU a trivial op costs ~15 µs more per
# call through custom_op than through Library. The dispatcher calls the implementations below directly.
_LIB = torch.library.Library("flowdcn", "FRAGMENT")


def _define(schema: str, impl, fake, backward=None, setup_context=None) -> None:
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"flowdcn::{name}", fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(f"flowdcn::{name}", backward, setup_context=setup_context, lib=_LIB)


def _like(t: torch.Tensor) -> torch.Tensor:
    """A fake output: contiguous like the real ones (empty_like would copy the strides of a permuted input)."""
    return t.new_empty(t.shape)


_FIELDS = "Tensor value, Tensor delta, Tensor scale_logit, Tensor weights, Tensor prior, Tensor s0, Tensor s_max, str rounding"


def _plain_setup(ctx, inputs, output):
    value, offsets, weights, rounding = inputs
    ctx.save_for_backward(value, offsets, weights)
    ctx.rounding = rounding


def _plain_backward(ctx, grad_out):
    value, offsets, weights = ctx.saved_tensors
    gv, go, gw = torch.ops.flowdcn.msdcn_cuda_backward(grad_out, value, offsets, weights, ctx.rounding)
    return gv, go, gw, None


def _deform_setup(ctx, inputs, output):
    value, delta, scale_logit, weights, prior, s0, s_max, rounding = inputs
    ctx.save_for_backward(value, delta, scale_logit, weights, prior, s0, s_max)
    ctx.rounding = rounding


def _deform_backward(ctx, grad_out):
    value, delta, scale_logit, weights, prior, s0, s_max = ctx.saved_tensors
    gv, gd, gs, gw, gs0 = torch.ops.flowdcn.msdcn_deform_cuda_backward(grad_out, value, delta, scale_logit, weights,
                                                                      prior, s0, s_max, ctx.rounding)
    return gv, gd, gs, gw, None, gs0, None, None


_define("msdcn_cuda_backward(Tensor grad_out, Tensor value, Tensor offsets, Tensor weights, str rounding)"
        " -> (Tensor, Tensor, Tensor)", _plain_backward_impl,
        lambda grad_out, value, offsets, weights, rounding: (_like(value), _like(offsets),
                                                             _like(weights)))
_define("msdcn_cuda(Tensor value, Tensor offsets, Tensor weights, str rounding) -> Tensor", _plain_forward,
        lambda value, offsets, weights, rounding: _like(value), _plain_backward, _plain_setup)
_define(f"msdcn_deform_cuda_backward(Tensor grad_out, {_FIELDS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        _deform_backward_impl,
        lambda grad_out, value, delta, scale_logit, weights, prior, s0, s_max, rounding: (
            _like(value), _like(delta), _like(scale_logit), _like(weights),
            _like(s0)))
_define(f"msdcn_deform_cuda({_FIELDS}) -> Tensor", _deform_forward,
        lambda value, delta, scale_logit, weights, prior, s0, s_max, rounding: _like(value),
        _deform_backward, _deform_setup)


_PACKED = "Tensor proj, Tensor prior, Tensor s0, Tensor s_max, int groups, int channels, int points, str rounding"


def _packed_setup(ctx, inputs, output):
    proj, prior, s0, s_max, groups, channels, points, rounding = inputs
    ctx.save_for_backward(proj, prior, s0, s_max)
    ctx.meta = (groups, channels, points, rounding)


def _packed_backward(ctx, grad_out):
    proj, prior, s0, s_max = ctx.saved_tensors
    gp, gs0 = torch.ops.flowdcn.msdcn_deform_packed_cuda_backward(grad_out, proj, prior, s0, s_max, *ctx.meta, None)
    return gp, None, gs0, None, None, None, None, None


def _packed_train_setup(ctx, inputs, output):
    proj, prior, s0, s_max, groups, channels, points, rounding = inputs
    ctx.save_for_backward(proj, prior, s0, s_max, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.meta = (groups, channels, points, rounding)


def _packed_train_backward(ctx, grad_out, _grad_counts):
    proj, prior, s0, s_max, counts = ctx.saved_tensors
    gp, gs0 = torch.ops.flowdcn.msdcn_deform_packed_cuda_backward(grad_out, proj, prior, s0, s_max, *ctx.meta, counts)
    return gp, None, gs0, None, None, None, None, None


def _packed_fake_out(proj, prior, s0, s_max, groups, channels, points, rounding):
    return proj.new_empty((*proj.shape[:3], groups, channels))


_define(f"msdcn_deform_packed_cuda_backward(Tensor grad_out, {_PACKED}, Tensor? counts) -> (Tensor, Tensor)", _packed_backward_impl,
        lambda grad_out, proj, prior, s0, s_max, groups, channels, points, rounding, counts: (_like(proj), _like(s0)))
_define(f"msdcn_deform_packed_cuda({_PACKED}) -> Tensor", _packed_forward, _packed_fake_out, _packed_backward, _packed_setup)
_define(f"msdcn_deform_packed_cuda_train({_PACKED}) -> (Tensor, Tensor)", _packed_forward_train,
        lambda proj, prior, s0, s_max, groups, channels, points, rounding: (
            _packed_fake_out(proj, prior, s0, s_max, groups, channels, points, rounding),
            proj.new_empty((_bucketing_words(proj, groups, points),), dtype=torch.int32)),
        _packed_train_backward, _packed_train_setup)


# ---------------------------------------------------------------- eager path
# The same implementations through autograd.Function: an eager call of the registered ops runs torch.library's
# Python autograd wrapper (measured ~100 µs of Python per forward+backward when they were custom_ops), which shows
# at 16² (kernels ~0.6 ms). torch.compile traces the registered ops instead.
class _PlainFn(torch.autograd.Function):
    """Eager autograd wrapper of the plain op (same implementation as flowdcn::msdcn_cuda)."""

    @staticmethod
    def forward(ctx, value, offsets, weights, rounding):
        ctx.save_for_backward(value, offsets, weights)
        ctx.rounding = rounding
        return _plain_forward(value, offsets, weights, rounding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return (*_plain_backward_impl(grad_out, *ctx.saved_tensors, ctx.rounding), None)


class _DeformFn(torch.autograd.Function):
    """Eager autograd wrapper of the fused op (same kernels as flowdcn::msdcn_deform_cuda). The inputs are prepared
    (aligned, fields in one dtype, constants on the device) once in forward and saved prepared, so backward goes
    straight to the kernels: at 16² the host's Python is a visible part of a fwd+bwd. Where preparing copies (C not a
    multiple of 8: a padded value; fields of mixed dtypes: fp32 copies) the copies, not the inputs, are kept for
    backward: the same kind of memory the copies inside backward would have taken, held from forward on. The
    training case (bf16 autocast, C = 72 or 64) copies nothing."""

    @staticmethod
    def forward(ctx, value, delta, scale_logit, weights, prior, s0, s_max, rounding):
        v, C, d, s, w, p, z, m = _deform_prep(value, delta, scale_logit, weights, prior, s0, s_max)
        ctx.save_for_backward(v, d, s, w, p, z, m)
        ctx.meta = (C, rounding, value.dtype, delta.dtype, scale_logit.dtype, weights.dtype, s0.dtype, s0.device)
        return _deform_forward_prepped(v, C, d, s, w, p, z, m, rounding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        v, d, s, w, p, z, m = ctx.saved_tensors
        C, rounding, vdt, ddt, sdt, wdt, s0dt, s0dev = ctx.meta
        gv, gd, gs, gw, gs0 = _deform_backward_prepped(grad_out, v, C, d, s, w, p, z, m, rounding)
        return (_grad_value(gv, vdt, C), _finish(gd, ddt), _finish(gs, sdt), _finish(gw, wdt), None,
                _s0_grad(gs0, s0dt, s0dev), None, None)


class _PackedFn(torch.autograd.Function):
    """Eager autograd wrapper of the packed op (same kernels as flowdcn::msdcn_deform_packed_cuda); inputs prepared once."""

    @staticmethod
    def forward(ctx, proj, prior, s0, s_max, groups, channels, points, rounding, mode):
        # mode (the caller decides: needs_input_grad ignores no_grad / inference_mode): 0 no backward will follow; 1 a
        # backward follows (the plane backward, or a gather backward that buckets the points itself); 2 the forward
        # buckets the points for the gather backward
        pj, p, z, m = _packed_prep(proj, prior, s0, s_max)
        ctx.meta = (groups, channels, points, rounding, s0.dtype, s0.device)
        if mode == 2:
            out, counts = _packed_forward_train_prepped(pj, p, z, m, groups, channels, points, rounding)
        else:
            out, counts = _packed_forward_prepped(pj, p, z, m, groups, channels, points, rounding), None
        if mode:
            ctx.save_for_backward(pj, p, z, m, counts)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        groups, channels, points, rounding, s0dt, s0dev = ctx.meta
        pj, p, z, m, counts = ctx.saved_tensors
        gp, gs0 = _packed_backward_prepped(grad_out, pj, p, z, m, groups, channels, points, rounding, counts)
        return gp, None, _s0_grad(gs0, s0dt, s0dev), None, None, None, None, None, None


# ---------------------------------------------------------------- public entry points
def msdcn(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, *, rounding: str = "floor") -> torch.Tensor:
    """MSDCN through the CUDA kernels (same contract as cuda_ext.msdcn)."""
    check_msdcn_inputs(value, offsets, weights, rounding)
    if torch.compiler.is_compiling():
        return torch.ops.flowdcn.msdcn_cuda(value, offsets, weights, rounding)
    return _PlainFn.apply(value, offsets, weights, rounding)


def msdcn_deform(
    value: torch.Tensor,
    delta: torch.Tensor,
    scale_logit: torch.Tensor,
    weights: torch.Tensor,
    prior: torch.Tensor,
    s0: torch.Tensor,
    s_max: torch.Tensor,
    *,
    rounding: str = "floor",
) -> torch.Tensor:
    """MSDCN with offsets (delta + prior)·σ(scale_logit + s0)·S_max computed inside the kernels."""
    check_deform_inputs(value, delta, scale_logit, weights, prior, s0, s_max, rounding)
    # The model slices the fields out of one GEMM output (strided views). Copy them here, where torch.compile
    # fuses the copies into its own kernels and autograd saves the contiguous tensors, rather than inside
    # the op, where each forward and each backward would copy all three again.
    delta, scale_logit, weights = delta.contiguous(), scale_logit.contiguous(), weights.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.flowdcn.msdcn_deform_cuda(value, delta, scale_logit, weights, prior, s0, s_max, rounding)
    return _DeformFn.apply(value, delta, scale_logit, weights, prior, s0, s_max, rounding)


def msdcn_deform_packed(proj: torch.Tensor, prior: torch.Tensor, s0: torch.Tensor, s_max: torch.Tensor, *, groups: int,
                        points: int, rounding: str = "floor") -> torch.Tensor:
    """msdcn_deform of a packed projection proj [B,H,W,G*C + 4*G*K] (reference.split_packed) -> [B,H,W,G,C]; read and its
    grad written in place where packed_served(), else through msdcn_deform on contiguous copies of the four parts."""
    channels = check_packed_inputs(proj, prior, s0, s_max, groups, points, rounding)   # no views: ~60 µs less per call
    if not packed_served(proj.shape, groups, points, proj.dtype):
        return msdcn_deform(*split_packed(proj, groups, points), prior, s0, s_max, rounding=rounding)
    grad = torch.is_grad_enabled() and (proj.requires_grad or s0.requires_grad)
    # a backward follows: the forward buckets the points for the gather backward, unless the plane backward serves
    count = grad and not _plane_backward_serves(proj, groups, channels, points)
    if torch.compiler.is_compiling():
        if count:
            return torch.ops.flowdcn.msdcn_deform_packed_cuda_train(proj, prior, s0, s_max, groups, channels, points, rounding)[0]
        return torch.ops.flowdcn.msdcn_deform_packed_cuda(proj, prior, s0, s_max, groups, channels, points, rounding)
    return _PackedFn.apply(proj, prior, s0, s_max, groups, channels, points, rounding, 2 if count else int(grad))
