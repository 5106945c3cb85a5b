"""torch.library registration of the reference op, so torch.compile and FSDP see one opaque op.

Forward and backward are separate custom ops; the backward recomputes the corner geometry
(the forward keeps no intermediates, like the CUDA kernel) and applies the explicit gradient formulas.
Floor mode on grids of at least 2×2 runs through grid_sample (fast_torch.py, several times faster
on CPU); trunc mode and 1-wide grids use the explicit gather of reference.py.
"""
from __future__ import annotations

import torch

from . import fast_torch
from .reference import msdcn_ref, msdcn_ref_backward


@torch.library.custom_op("flowdcn::msdcn_ref", mutates_args=())
def msdcn_ref_op(value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str) -> torch.Tensor:
    if fast_torch.supported(value, rounding):
        return fast_torch.forward(value, offsets, weights)
    return msdcn_ref(value, offsets, weights, rounding)


@msdcn_ref_op.register_fake
def _(value, offsets, weights, rounding):
    return torch.empty_like(value)


@torch.library.custom_op("flowdcn::msdcn_ref_backward", mutates_args=())
def msdcn_ref_backward_op(
    grad_out: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, rounding: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if fast_torch.supported(value, rounding):
        return fast_torch.backward(grad_out, value, offsets, weights)
    return msdcn_ref_backward(grad_out, value, offsets, weights, rounding)


@msdcn_ref_backward_op.register_fake
def _(grad_out, value, offsets, weights, rounding):
    return torch.empty_like(value), torch.empty_like(offsets), torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    value, offsets, weights, rounding = inputs
    ctx.save_for_backward(value, offsets, weights)
    ctx.rounding = rounding


def _backward(ctx, grad_out):
    value, offsets, weights = ctx.saved_tensors
    gv, go, gw = msdcn_ref_backward_op(grad_out.contiguous(), value, offsets, weights, ctx.rounding)
    return gv, go, gw, None


msdcn_ref_op.register_autograd(_backward, setup_context=_setup_context)
