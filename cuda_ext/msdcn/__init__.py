"""The MSDCN op: ``msdcn(value, offsets, weights)``, the fused ``msdcn_deform(...)`` and ``msdcn_deform_packed(proj, ...)``
(the fused op on one projection [B,H,W,G*C + 4*G*K] holding value | delta | scale_logit | weights per pixel: what the
FlowDCN model calls; see split_packed).

Contract (this docstring; the project's design.md):
  value   [B,H,W,G,C]   bf16 / fp16 / fp32 (fp64 for exact checks)
  offsets [B,H,W,G,K,2] token-grid units relative to the query pixel, last dim (x, y); used in fp32
  weights [B,H,W,G,K]   unnormalised
  returns [B,H,W,G,C]   in value.dtype

``impl``: "torch" (reference, any device), "cuda" (JIT-compiled kernels, see build.py),
"auto" (cuda when the kernels can be built and the inputs are on a CUDA device, else torch).
"""
from __future__ import annotations

import torch

from . import ops as _ops  # registers flowdcn::msdcn_ref
from .reference import (check_deform_inputs, check_msdcn_inputs, deform_offsets_ref, msdcn_grid_sample_ref, msdcn_ref,
                        packed_channels, split_packed)

IMPLS = ("auto", "torch", "cuda")

__all__ = ["msdcn", "msdcn_deform", "msdcn_deform_packed", "split_packed", "msdcn_ref", "deform_offsets_ref", "msdcn_grid_sample_ref",
           "cuda_available", "IMPLS"]


def _cuda_backend():
    """The CUDA backend module, or None when it is not part of this build."""
    try:
        from . import cuda as backend
    except ImportError:
        return None
    return backend


# Both checks below may build the extension (file IO, hashing, nvcc): torch.compile must not trace into
# them, or the first compiled call of a block is cut into several graphs around the build and keeps
# those graph breaks for good (measured: 5 graphs per FlowDCN block, ~2x slower compiled training step).
# assume_constant_result makes dynamo run them once in plain Python and bake in the answer.
def _gpu_present() -> bool:
    return torch.cuda.is_available()


@torch.compiler.assume_constant_result
def cuda_available() -> bool:
    """True when a CUDA device is present and the JIT kernels build (or are cached)."""
    backend = _cuda_backend()
    return backend is not None and _gpu_present() and backend.available()


@torch.compiler.assume_constant_result
def _require_cuda() -> bool:
    """Load the kernels or raise a clear error (no nvcc, no GPU, build failure)."""
    backend = _cuda_backend()
    if backend is None:
        raise RuntimeError("msdcn: impl='cuda' requested but cuda_ext.msdcn.cuda is not available in this build")
    backend.require()
    return True


def _use_cuda(impl: str, device: torch.device) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"msdcn: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"msdcn: impl='cuda' needs CUDA tensors, got device {device}")
        return _require_cuda()
    return device.type == "cuda" and cuda_available()


def _auto_cuda(impl: str, device: torch.device, shape) -> bool:
    """_use_cuda, plus: "auto" falls back to the reference for value shapes [B,H,W,G,C] the kernels do not take."""
    if not _use_cuda(impl, device):
        return False
    return impl == "cuda" or _cuda_backend().supports(shape)


def msdcn(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, *, rounding: str = "floor", impl: str = "auto") -> torch.Tensor:
    """Groupwise deformable sampling: out[b,h,w,g] = sum_k weights[...,k] * bilinear(value[b,:,:,g], pos_k)."""
    check_msdcn_inputs(value, offsets, weights, rounding)
    if _auto_cuda(impl, value.device, value.shape):
        return _cuda_backend().msdcn(value, offsets, weights, rounding=rounding)
    return torch.ops.flowdcn.msdcn_ref(value, offsets, weights, rounding)


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
    impl: str = "auto",
) -> torch.Tensor:
    """MSDCN with FlowDCN's deformable field fused in: offsets = (delta + prior)·σ(scale_logit + s0)·S_max.

    delta [B,H,W,G,K,2], scale_logit [B,H,W,G,K], prior [K,2], s0 [G], s_max [2] as (x, y).
    The CUDA path computes the offsets in registers (the [B,H,W,G,K,2] field never touches memory);
    the torch path composes deform_offsets_ref and msdcn_ref, and is the spec.
    """
    check_deform_inputs(value, delta, scale_logit, weights, prior, s0, s_max, rounding)   # both paths, before any work
    if _auto_cuda(impl, value.device, value.shape):
        return _cuda_backend().msdcn_deform(value, delta, scale_logit, weights, prior, s0, s_max, rounding=rounding)
    offsets = deform_offsets_ref(delta, scale_logit, prior, s0, s_max)
    return msdcn(value, offsets, weights, rounding=rounding, impl="torch")


def msdcn_deform_packed(
    proj: torch.Tensor,
    prior: torch.Tensor,
    s0: torch.Tensor,
    s_max: torch.Tensor,
    *,
    groups: int,
    points: int,
    rounding: str = "floor",
    impl: str = "auto",
) -> torch.Tensor:
    """msdcn_deform of one packed projection proj [B,H,W,G*C + 4*G*K] -> [B,H,W,G,C].

    Each pixel's row of proj is value (G*C) | delta (2*G*K, ordered (g, k, xy)) | scale_logit (G*K) | weights (G*K):
    the output of one GEMM (FlowDCN's four input projections). The CUDA path reads it in place and writes its grad in
    place (no split copies, no concatenation of the grads); the torch path takes views (split_packed) into msdcn_deform.
    """
    C = packed_channels(proj, groups, points)   # validates proj's shape
    if _auto_cuda(impl, proj.device, (*proj.shape[:3], groups, C)):
        # the backend checks the other inputs, without building views (the eager path is host-bound at 16²)
        return _cuda_backend().msdcn_deform_packed(proj, prior, s0, s_max, groups=groups, points=points, rounding=rounding)
    value, delta, scale_logit, weights = split_packed(proj, groups, points)
    check_deform_inputs(value, delta, scale_logit, weights, prior, s0, s_max, rounding)
    offsets = deform_offsets_ref(delta, scale_logit, prior, s0, s_max)
    return msdcn(value, offsets, weights, rounding=rounding, impl="torch")
