"""GPU tests of the CUDA MSDCN kernels against the pure-PyTorch reference (cuda_ext/msdcn/reference.py),
and CPU tests of the backward kernels' source run under a thread emulation of CUDA (csrc/emu/, g++).

Tolerances: fp64 kernels vs the fp64 reference to 1e-12 relative (same formula, reordered sums);
fp32 to 1e-5; bf16/fp16 values against the fp64 reference of the same rounded inputs to 1e-2
(one rounding of the output). Gradients: fp64 tight, plus torch.autograd.gradcheck on tiny shapes.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_ext.msdcn.reference import deform_offsets_ref, msdcn_ref, msdcn_ref_backward

cuda = pytest.mark.cuda  # every test here except the emulated ones (test_emulated_*) needs a GPU

ROUNDINGS = ("floor", "trunc")
# (B, H, W, G, C, K): odd and non-square grids, B=1, C=72 (XL), single pixel rows/columns, K=1.
SHAPES = [(2, 5, 7, 2, 8, 3), (1, 9, 4, 3, 72, 9), (3, 1, 6, 1, 16, 2), (1, 6, 1, 2, 24, 1), (2, 11, 13, 4, 64, 9)]


@pytest.fixture(scope="module")
def cuda_mod():
    from cuda_ext.msdcn import cuda

    cuda.require()  # fails with the build error if the extension cannot be built
    return cuda


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(shape, dtype=torch.float64, field_dtype=None, seed=0, spread=2.5, device="cuda"):
    """Random value/offsets/weights; offsets include negative and out-of-grid positions (some far outside)."""
    B, H, W, G, C, K = shape
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(B, H, W, G, C, generator=gen, dtype=torch.float64)
    offsets = torch.randn(B, H, W, G, K, 2, generator=gen, dtype=torch.float64) * spread
    far = torch.rand(B, H, W, G, K, 2, generator=gen) < 0.05
    offsets = torch.where(far, offsets.sign() * (max(H, W) + 3.5), offsets)  # fully outside the grid
    weights = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64)
    fdt = field_dtype or dtype
    return value.to(device, dtype), offsets.to(device, fdt), weights.to(device, fdt)


def make_deform(shape, dtype=torch.float64, field_dtype=None, seed=0, device="cuda"):
    """Random inputs of the fused op: delta, scale_logit, prior [K,2], s0 [G], s_max [2] (x != y)."""
    B, H, W, G, C, K = shape
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(B, H, W, G, C, generator=gen, dtype=torch.float64)
    delta = torch.randn(B, H, W, G, K, 2, generator=gen, dtype=torch.float64) * 0.7
    scale_logit = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64)
    weights = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64)
    prior = torch.randn(K, 2, generator=gen, dtype=torch.float64)
    s0 = torch.randn(G, generator=gen, dtype=torch.float64)
    s_max = torch.tensor([3.0, 2.0], dtype=torch.float64)
    fdt = field_dtype or dtype
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    return (value.to(device, dtype), delta.to(device, fdt), scale_logit.to(device, fdt), weights.to(device, fdt),
            prior.to(device, adt), s0.to(device, adt), s_max.to(device, adt))


def poison_allocator(nbytes: int = 1 << 26) -> None:
    """Fill freed caching-allocator blocks with NaN, so any output element the kernel never writes shows up."""
    torch.cuda.synchronize()
    junk = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del junk
    for size in (1 << 12, 1 << 16, 1 << 20):  # small-pool blocks too
        j = torch.full((size,), float("nan"), device="cuda")
        del j


# ---------------------------------------------------------------- forward
@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_fp64_matches_reference(cuda_mod, shape, rounding):
    value, offsets, weights = make_inputs(shape, seed=hash(shape) % 1000)
    poison_allocator()
    out = cuda_mod.msdcn(value, offsets, weights, rounding=rounding)
    ref = msdcn_ref(value.cpu(), offsets.cpu(), weights.cpu(), rounding)
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output elements"
    assert rel_err(out.cpu(), ref) < 1e-12


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize(
    "dtype,field_dtype,tol",
    [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 1e-2), (torch.bfloat16, torch.float32, 1e-2),
     (torch.float16, torch.float16, 2e-3), (torch.float16, torch.float32, 2e-3)],
)
@cuda
def test_forward_low_precision(cuda_mod, dtype, field_dtype, tol, rounding):
    shape = (2, 9, 12, 4, 72, 9)
    value, offsets, weights = make_inputs(shape, dtype=dtype, field_dtype=field_dtype, seed=3)
    poison_allocator()
    out = cuda_mod.msdcn(value, offsets, weights, rounding=rounding)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = msdcn_ref(value.cpu().double(), offsets.cpu().double(), weights.cpu().double(), rounding)
    assert rel_err(out.cpu(), ref) < tol


@cuda
def test_floor_vs_trunc_differ_only_for_negative_coordinates(cuda_mod):
    """The official trunc rule extrapolates for x in (-2, 0): row [1, 10, 100] at x = -0.5 gives -3.5 (floor: 0.5)."""
    value = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(1, 1, 3, 1, 1).expand(1, 1, 3, 1, 8).contiguous().cuda()
    offsets = torch.zeros(1, 1, 3, 1, 1, 2, dtype=torch.float64, device="cuda")
    offsets[0, 0, 0, 0, 0, 0] = -0.5  # query at column 0 samples x = -0.5
    weights = torch.ones(1, 1, 3, 1, 1, dtype=torch.float64, device="cuda")
    floor = cuda_mod.msdcn(value, offsets, weights, rounding="floor")[0, 0, 0, 0, 0].item()
    trunc = cuda_mod.msdcn(value, offsets, weights, rounding="trunc")[0, 0, 0, 0, 0].item()
    assert floor == pytest.approx(0.5) and trunc == pytest.approx(-3.5)


# ---------------------------------------------------------------- backward
def check_backward_fp64(value, offsets, weights, rounding):
    """The CUDA backward op on poisoned memory against the explicit reference backward, fp64, 1e-11."""
    grad = torch.randn_like(value)
    poison_allocator()
    got = torch.ops.flowdcn.msdcn_cuda_backward(grad, value, offsets, weights, rounding)
    want = msdcn_ref_backward(grad.cpu(), value.cpu(), offsets.cpu(), weights.cpu(), rounding)
    for name, g, w in zip(("value", "offsets", "weights"), got, want):
        assert torch.isfinite(g).all(), f"grad {name} has unwritten elements"
        assert rel_err(g.cpu(), w) < 1e-11, name


@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_fp64_matches_reference(cuda_mod, shape, rounding):
    value, offsets, weights = make_inputs(shape, seed=7 + hash(shape) % 1000)
    check_backward_fp64(value, offsets, weights, rounding)


@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_autograd_matches_reference_autograd(cuda_mod, rounding):
    shape = (2, 6, 5, 3, 16, 4)
    inputs = make_inputs(shape, seed=11)
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.cpu().clone().requires_grad_(True) for t in inputs]
    gy = torch.randn(shape[:5], dtype=torch.float64)
    (cuda_mod.msdcn(*a, rounding=rounding) * gy.cuda()).sum().backward()
    (msdcn_ref(*b, rounding=rounding) * gy).sum().backward()
    for ta, tb in zip(a, b):
        assert rel_err(ta.grad.cpu(), tb.grad) < 1e-11


@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_gradcheck_fp64(cuda_mod, rounding):
    value, offsets, weights = make_inputs((1, 3, 4, 2, 8, 2), seed=5, spread=1.3)
    args = [t.requires_grad_(True) for t in (value, offsets, weights)]
    assert torch.autograd.gradcheck(lambda v, o, w: cuda_mod.msdcn(v, o, w, rounding=rounding), args, eps=1e-6, atol=1e-5)


@cuda
def test_backward_bf16_uses_fp32_accumulation(cuda_mod):
    """bf16 grads against the fp64 reference grads of the same rounded inputs: no bf16 atomics (those drift ~1e-1)."""
    shape = (2, 8, 8, 4, 64, 9)
    value, offsets, weights = make_inputs(shape, dtype=torch.bfloat16, field_dtype=torch.float32, seed=2, spread=1.0)
    grad = torch.randn_like(value)
    gv, go, gw = torch.ops.flowdcn.msdcn_cuda_backward(grad, value, offsets, weights, "floor")
    assert (gv.dtype, go.dtype, gw.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    want = msdcn_ref_backward(grad.cpu().double(), value.cpu().double(), offsets.cpu().double(), weights.cpu().double(), "floor")
    assert rel_err(gv.cpu(), want[0]) < 1e-2
    assert rel_err(go.cpu(), want[1]) < 1e-5
    assert rel_err(gw.cpu(), want[2]) < 1e-5


# ---------------------------------------------------------------- fused deformable field
@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 2, 8, 3), (1, 7, 9, 3, 72, 9)])
def test_deform_fp64_forward_and_grads(cuda_mod, shape, rounding):
    inputs = make_deform(shape, seed=13)
    a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    b = [t.cpu().clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    gy = torch.randn(shape[:5], dtype=torch.float64)
    poison_allocator()
    out = cuda_mod.msdcn_deform(*a, rounding=rounding)
    value, delta, scale, weights, prior, s0, s_max = b
    ref = msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights, rounding)
    assert rel_err(out.detach().cpu(), ref.detach()) < 1e-12
    (out * gy.cuda()).sum().backward()
    (ref * gy).sum().backward()
    for name, i in (("value", 0), ("delta", 1), ("scale_logit", 2), ("weights", 3), ("s0", 5)):
        assert torch.isfinite(a[i].grad).all(), name
        assert rel_err(a[i].grad.cpu(), b[i].grad) < 1e-10, name


@cuda
def test_backward_alerts_under_deterministic_mode(cuda_mod):
    """grad_value is summed with atomics in no fixed order: deterministic mode raises (warn_only: warns), naming the op."""
    a = [t.clone().requires_grad_(True) for t in make_inputs((1, 4, 4, 2, 8, 3), dtype=torch.float32, seed=3)]
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="msdcn_backward"):
            cuda_mod.msdcn(*a).sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="msdcn_backward"):
            cuda_mod.msdcn(*a).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert a[0].grad is not None and torch.isfinite(a[0].grad).all()


@cuda
def test_deform_gradcheck_fp64(cuda_mod):
    inputs = make_deform((1, 3, 4, 2, 8, 2), seed=17)
    value, delta, scale, weights, prior, s0, s_max = inputs
    args = [t.requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    fn = lambda v, d, s, w, z: cuda_mod.msdcn_deform(v, d, s, w, prior, z, s_max)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@cuda
@pytest.mark.parametrize("field_dtype", [torch.bfloat16, torch.float32])
def test_deform_bf16_autocast_dtypes(cuda_mod, field_dtype):
    """Autocast gives bf16 value and fields: outputs and grads come back in each input's dtype, close to fp64."""
    shape = (2, 8, 10, 4, 72, 9)
    inputs = make_deform(shape, dtype=torch.bfloat16, field_dtype=field_dtype, seed=19)
    a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    b = [t.cpu().double().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    gy = torch.randn(shape[:5]).to(torch.bfloat16)
    out = cuda_mod.msdcn_deform(*a)
    assert out.dtype == torch.bfloat16
    value, delta, scale, weights, prior, s0, s_max = b
    ref = msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights)
    assert rel_err(out.detach().cpu(), ref.detach()) < 1e-2
    (out.float() * gy.cuda().float()).sum().backward()
    (ref * gy.double()).sum().backward()
    for name, i, tol in (("value", 0, 1e-2), ("delta", 1, 2e-2), ("scale_logit", 2, 2e-2), ("weights", 3, 1e-2), ("s0", 5, 1e-2)):
        assert a[i].grad.dtype == inputs[i].dtype, name
        assert rel_err(a[i].grad.cpu(), b[i].grad) < tol, name


# ---------------------------------------------------------------- layouts, streams, devices, sizes
@cuda
def test_noncontiguous_and_unaligned_inputs(cuda_mod):
    shape = (2, 5, 6, 3, 16, 4)
    value, offsets, weights = make_inputs(shape, seed=23)
    v_nc = value.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)        # transposed strides
    big = torch.cat([torch.zeros(1, dtype=value.dtype, device="cuda"), value.flatten()])
    v_un = big[1:].view(shape[:5])                                                   # 8-byte offset base
    o_nc = torch.stack([offsets[..., 0], offsets[..., 1]], dim=0).movedim(0, -1)     # last dim stride != 1
    ref = msdcn_ref(value.cpu(), offsets.cpu(), weights.cpu())
    for v in (v_nc, v_un):
        assert rel_err(cuda_mod.msdcn(v, o_nc, weights).cpu(), ref) < 1e-12


@cuda
def test_channels_not_multiple_of_8_are_padded(cuda_mod):
    shape = (1, 4, 5, 2, 12, 3)
    inputs = make_inputs(shape, seed=29)
    a = [t.clone().requires_grad_(True) for t in inputs]
    b = [t.cpu().clone().requires_grad_(True) for t in inputs]
    out = cuda_mod.msdcn(*a)
    ref = msdcn_ref(*b)
    assert out.shape == ref.shape and rel_err(out.detach().cpu(), ref.detach()) < 1e-12
    out.sum().backward()
    ref.sum().backward()
    for ta, tb in zip(a, b):
        assert rel_err(ta.grad.cpu(), tb.grad) < 1e-11


@cuda
@pytest.mark.parametrize("threads,rounds,split,lean", [(128, 3, True, True), (512, 2, False, True), (64, 5, True, False), (256, 1, False, False)])
def test_launch_shapes(cuda_mod, threads, rounds, split, lean):
    """Other block sizes and several rounds of queries per block (with a ragged tail) give the same results."""
    shape = (2, 7, 5, 3, 24, 4)  # N = 70 queries: not a multiple of any queries-per-block count
    inputs = make_deform(shape, seed=53)
    saved = {k: list(v) for k, v in cuda_mod._LAUNCH.items()}
    saved_split, cuda_mod._SPLIT_BWD = cuda_mod._SPLIT_BWD, split
    saved_lean, cuda_mod._LEAN_BWD = cuda_mod._LEAN_BWD, lean
    try:
        for phase in ("forward", "backward"):
            cuda_mod.set_launch(phase, threads=threads, rounds=rounds)
        a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
        poison_allocator()
        out = cuda_mod.msdcn_deform(*a)
        out.square().sum().backward()
    finally:
        cuda_mod._SPLIT_BWD, cuda_mod._LEAN_BWD = saved_split, saved_lean
        for phase, (t, r) in saved.items():
            cuda_mod.set_launch(phase, threads=t, rounds=r)
    b = [t.cpu().clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    value, delta, scale, weights, prior, s0, s_max = b
    ref = msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights)
    ref.square().sum().backward()
    assert rel_err(out.detach().cpu(), ref.detach()) < 1e-12
    for i in (0, 1, 2, 3, 5):
        assert rel_err(a[i].grad.cpu(), b[i].grad) < 1e-10


@cuda
def test_side_stream(cuda_mod):
    """Work is queued on the current stream: results are right when a side stream is current."""
    value, offsets, weights = make_inputs((2, 16, 16, 4, 64, 9), dtype=torch.float32, seed=31)
    ref = msdcn_ref(value.cpu(), offsets.cpu(), weights.cpu())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000)  # a slow stream: a launch on the default stream would race ahead
        out = cuda_mod.msdcn(value, offsets, weights)
        ret = out.clone()
    side.synchronize()
    assert rel_err(ret.cpu(), ref) < 1e-5


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(cuda_mod):
    value, offsets, weights = make_inputs((1, 6, 7, 2, 16, 3), seed=37, device="cuda:1")
    out = cuda_mod.msdcn(value, offsets, weights)  # current device is still cuda:0
    assert out.device == value.device
    assert rel_err(out.cpu(), msdcn_ref(value.cpu(), offsets.cpu(), weights.cpu())) < 1e-12


@cuda
def test_int64_indexing_beyond_2_31_elements(cuda_mod):
    """value with > 2^31 elements: the last batch element must equal the reference run on it alone."""
    H, W, G, C, K = 128, 128, 4, 256, 2
    B = 2**31 // (H * W * G * C) + 1  # 129 images: 2.2e9 elements
    free, _ = torch.cuda.mem_get_info()
    need = 2 * B * H * W * G * C * 2 + (1 << 30)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free, {free / 2**30:.1f} GiB available")
    value = torch.empty(B, H, W, G, C, dtype=torch.bfloat16, device="cuda")
    value[:-1].fill_(1.0)
    gen = torch.Generator(device="cuda").manual_seed(41)
    value[-1:] = torch.randn(1, H, W, G, C, device="cuda", generator=gen).to(torch.bfloat16)
    offsets = (torch.rand(B, H, W, G, K, 2, device="cuda", generator=gen) - 0.5) * 6
    weights = torch.randn(B, H, W, G, K, device="cuda", generator=gen)
    out = cuda_mod.msdcn(value, offsets, weights)
    last = out[-1:].float().cpu()
    del out
    ref = msdcn_ref(value[-1:].cpu().double(), offsets[-1:].cpu().double(), weights[-1:].cpu().double())
    assert value.numel() > 2**31
    assert rel_err(last, ref) < 1e-2


@cuda
def test_torch_compile_fullgraph_no_graph_break(cuda_mod):
    """A block-like function around msdcn_deform compiles with fullgraph=True and matches eager (fwd and grads)."""
    shape = (2, 6, 6, 2, 16, 9)
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, dtype=torch.float32, seed=43)
    lin = torch.nn.Linear(32, 32).cuda()

    def block(v, d, s, w, z):
        y = cuda_mod.msdcn_deform(v, d, s, w, prior, z, s_max)
        return lin(y.flatten(-2)).square().mean()

    args = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    args_c = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    eager = block(*args)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(*args_c)
    compiled.backward()
    assert rel_err(compiled.detach().cpu(), eager.detach().cpu()) < 1e-5
    for ta, tb in zip(args_c, args):
        assert rel_err(ta.grad.cpu(), tb.grad.cpu()) < 1e-5


@cuda
def test_opcheck_custom_ops(cuda_mod):
    """torch.library.opcheck: schema, fake impls, autograd registration and AOT dispatch agree with the real ops."""
    value, delta, scale, weights, prior, s0, s_max = make_deform((1, 4, 5, 2, 16, 3), seed=59)
    args = [t.requires_grad_(True) for t in (value, delta, scale, weights)] + [prior, s0.requires_grad_(True), s_max, "floor"]
    torch.library.opcheck(torch.ops.flowdcn.msdcn_deform_cuda.default, tuple(args))
    v, o, w = make_inputs((1, 4, 5, 2, 16, 3), seed=61)
    torch.library.opcheck(torch.ops.flowdcn.msdcn_cuda.default, (v.requires_grad_(True), o.requires_grad_(True), w.requires_grad_(True), "trunc"))


@cuda
def test_eager_path_equals_custom_op_path(cuda_mod):
    """Eager calls (autograd.Function) and the torch.library ops run the same implementation: identical results."""
    inputs = make_deform((2, 5, 6, 3, 24, 4), dtype=torch.float32, seed=67)
    a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    b = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    out_a = cuda_mod.msdcn_deform(*a)
    out_b = torch.ops.flowdcn.msdcn_deform_cuda(*b, "floor")
    gy = torch.randn_like(out_a)
    (out_a * gy).sum().backward()
    (out_b * gy).sum().backward()
    assert torch.equal(out_a, out_b)
    for i in (0, 1, 2, 3, 5):
        assert torch.allclose(a[i].grad, b[i].grad, rtol=1e-6, atol=1e-6)  # value grads: atomics order differs


@cuda
def test_public_dispatch_and_auto(cuda_mod):
    import cuda_ext

    value, offsets, weights = make_inputs((1, 5, 5, 2, 16, 3), seed=47)
    assert cuda_ext.cuda_available()
    a = cuda_ext.msdcn(value, offsets, weights, impl="cuda")
    b = cuda_ext.msdcn(value, offsets, weights, impl="auto")
    c = cuda_ext.msdcn(value, offsets, weights, impl="torch")
    assert rel_err(a, c) < 1e-12 and rel_err(b, c) < 1e-12


# ---------------------------------------------------------------- whole model
@cuda
def test_flowdcn_debug_model_cuda_equals_torch(cuda_mod):
    """The FlowDCN debug model gives the same loss and parameter gradients with impl='cuda' and impl='torch'."""
    modeling = pytest.importorskip("modeling")
    torch.manual_seed(0)
    models = {}
    for impl in ("torch", "cuda"):
        m = modeling.build_model("FlowDCN-debug", device="meta", msdcn_impl=impl)
        m.to_empty(device="cuda")
        m.init_weights()
        models[impl] = m
    with torch.no_grad():  # leave init (zero projections) so offsets and scales vary per token
        for p in models["torch"].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    models["cuda"].load_state_dict(models["torch"].state_dict())
    N = 3
    x = torch.randn(N, 4, 16, 12, device="cuda")
    t = torch.rand(N, device="cuda")
    y = torch.randint(0, 10, (N,), device="cuda")
    target = torch.randn_like(x)
    losses = {}
    for impl, m in models.items():
        loss = (m(x, t, y) - target).square().mean()
        loss.backward()
        losses[impl] = loss.item()
    assert losses["cuda"] == pytest.approx(losses["torch"], rel=1e-5)
    grads_t = dict(models["torch"].named_parameters())
    for name, p in models["cuda"].named_parameters():
        if p.grad is None:
            assert grads_t[name].grad is None, name
            continue
        assert rel_err(p.grad, grads_t[name].grad) < 1e-4, name


# ---------------------------------------------------------------- gather vs scatter backward
@pytest.fixture
def backward_kind(cuda_mod, monkeypatch):
    """Yields a setter of the backward: "gather" (the plane kernels off), "scatter", or "plane" (the gather backward
    selected and the plane kernels forced, FLOWDCN_MSDCN_PLANE=force, also below their block-count rule); restores
    the module's backward choice afterwards."""
    saved = cuda_mod._BACKWARD

    def choose(kind: str) -> None:
        monkeypatch.setenv("FLOWDCN_MSDCN_PLANE", "force" if kind == "plane" else "off")
        cuda_mod.set_backward("gather" if kind == "plane" else kind)

    yield choose
    cuda_mod.set_backward(saved)


@cuda
@pytest.mark.parametrize("kind", ["gather", "scatter", "plane"])
@pytest.mark.parametrize("shape", [(2, 9, 11, 3, 24, 5), (1, 4, 5, 1, 264, 3)])  # C=264: 33 lanes, gather falls back
def test_backward_kinds_fp64_match_reference(cuda_mod, backward_kind, kind, shape):
    """Each backward against the reference in fp64; the plane kernels also serve C = 264 (no lane limit), where the
    gather backward falls back to the scatter one."""
    backward_kind(kind)
    B, H, W, G, C = shape[:5]
    assert cuda_mod._module().plane_serves(B, H, W, G, C, shape[5], 8, True, torch.cuda.current_device(), True) == (kind == "plane")
    value, offsets, weights = make_inputs(shape, seed=61, spread=4.0)
    check_backward_fp64(value, offsets, weights, "floor")


@cuda
def test_gather_backward_beyond_2_24_rows(cuda_mod, backward_kind):
    """N*G > 2^24 grad_out rows (where an earlier multiply-shift row division overflowed; the rows are now stored per
    entry and scaled in 64 bits): the gather backward of the last image equals the scatter backward's."""
    B, H, W, G, C, K = 2, 2900, 2900, 2, 8, 3  # N*G = 33.6M rows > 2^24
    free, _ = torch.cuda.mem_get_info()
    if free < 8 * 2**30:
        pytest.skip(f"needs 8 GiB free, {free / 2**30:.1f} GiB available")
    gen = torch.Generator(device="cuda").manual_seed(43)
    value = torch.randn(B, H, W, G, C, device="cuda", generator=gen)
    offsets = (torch.rand(B, H, W, G, K, 2, device="cuda", generator=gen) - 0.5) * 6
    weights = torch.randn(B, H, W, G, K, device="cuda", generator=gen)
    grad = torch.randn(B, H, W, G, C, device="cuda", generator=gen)
    got = {}
    for kind in ("gather", "scatter"):
        backward_kind(kind)
        got[kind] = [t[-1].cpu() for t in torch.ops.flowdcn.msdcn_cuda_backward(grad, value, offsets, weights, "floor")]
    assert B * H * W * G > 2**24
    for name, a, b in zip(("value", "offsets", "weights"), got["gather"], got["scatter"]):
        assert rel_err(a, b) < 1e-5, name  # fp32: summation order only


@cuda
@pytest.mark.parametrize("field_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C", [72, 64, 8])
def test_gather_bf16_equals_scatter(cuda_mod, backward_kind, field_dtype, C):
    """bf16 value: the gather and scatter backward agree to fp32 summation order and one bf16 rounding."""
    shape = (2, 20, 18, 4, C, 9)
    inputs = make_deform(shape, dtype=torch.bfloat16, field_dtype=field_dtype, seed=81)
    gy = torch.randn(shape[:5]).to(torch.bfloat16).cuda()
    grads = {}
    for kind in ("gather", "scatter"):
        backward_kind(kind)
        a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
        torch.autograd.backward(cuda_mod.msdcn_deform(*a), gy)
        grads[kind] = [a[i].grad for i in (0, 1, 2, 3, 5)]
    for name, j, i in (("value", 0, 0), ("delta", 1, 1), ("scale_logit", 2, 2), ("weights", 3, 3), ("s0", 4, 5)):
        assert grads["gather"][j].dtype == inputs[i].dtype, name
        assert torch.isfinite(grads["gather"][j]).all(), name
        assert rel_err(grads["gather"][j], grads["scatter"][j]) < 1e-2, name


@cuda
@pytest.mark.parametrize("C,vec", [(72, "1"), (72, "3"), (64, "1"), (64, "2"), (64, "4"), (24, "3")])
def test_gather_pull_runs_per_lane_bf16(cuda_mod, backward_kind, monkeypatch, C, vec):
    """Every pull width (FLOWDCN_MSDCN_PULL_VEC runs of 8 channels per lane) gives the scatter backward's grads in bf16."""
    shape = (2, 13, 11, 4, C, 9)
    inputs = make_deform(shape, dtype=torch.bfloat16, field_dtype=torch.float32, seed=87)
    gy = torch.randn(shape[:5]).to(torch.bfloat16).cuda()
    grads = {}
    for kind in ("gather", "scatter"):
        backward_kind(kind)
        monkeypatch.setenv("FLOWDCN_MSDCN_PULL_VEC", vec)
        a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
        torch.autograd.backward(cuda_mod.msdcn_deform(*a), gy)
        grads[kind] = [a[i].grad for i in (0, 1, 2, 3, 5)]
    for j, name in enumerate(("value", "delta", "scale_logit", "weights", "s0")):
        assert torch.isfinite(grads["gather"][j]).all(), name
        assert rel_err(grads["gather"][j], grads["scatter"][j]) < 1e-2, name


@cuda
@pytest.mark.parametrize("kind", ["gather", "scatter"])
@pytest.mark.parametrize("shape", [(0, 4, 5, 2, 24, 3), (2, 4, 5, 2, 24, 0)])  # no images; no sampling points
def test_empty_inputs_give_zero_grads_of_the_promised_shapes(cuda_mod, backward_kind, kind, shape):
    """B = 0 or K = 0: the backward op returns zero grads shaped as its fake impl promises (d/ds0: [G]), eager and direct."""
    backward_kind(kind)
    inputs = make_deform(shape)
    grads = torch.ops.flowdcn.msdcn_deform_cuda_backward(torch.zeros(shape[:5], dtype=torch.float64, device="cuda"), *inputs, "floor")
    for g, x in zip(grads, [inputs[i] for i in (0, 1, 2, 3, 5)]):
        assert g.shape == x.shape and g.dtype == x.dtype, (g.shape, x.shape)
        assert not g.any()


@cuda
def test_gather_pull_rejects_a_width_that_does_not_divide(cuda_mod, backward_kind, monkeypatch):
    """FLOWDCN_MSDCN_PULL_VEC=3 at C=64 (8 runs of 8 channels) is an error naming the switch, not a wrong result."""
    backward_kind("gather")
    monkeypatch.setenv("FLOWDCN_MSDCN_PULL_VEC", "3")
    value, offsets, weights = make_inputs((1, 4, 4, 2, 64, 3), seed=5)
    with pytest.raises(ValueError, match="FLOWDCN_MSDCN_PULL_VEC=3 must divide C/8 = 8"):
        torch.ops.flowdcn.msdcn_cuda_backward(torch.randn_like(value), value, offsets, weights, "floor")


_LAUNCHER_ERRORS = r"""
import sys, torch
from cuda_ext.msdcn import cuda
cuda.require()
mod = cuda._module()
v = torch.randn(1, 4, 4, 2, 64, device="cuda", dtype=torch.float64)
o = torch.randn(1, 4, 4, 2, 3, 2, device="cuda", dtype=torch.float64)
w = torch.randn(1, 4, 4, 2, 3, device="cuda", dtype=torch.float64)
e = torch.empty(0, device="cuda", dtype=torch.float64)
launch = [256, 1, True, True, True, False]
cases = {  # (variant, tile_h, tile_w, radius, pull_vec) -> the message the launcher must raise
    (7, 8, 8, 2, 0): "backward variant must be 0 (scatter), 1 (tiled, atomic window), 2 (tiled, sorted window) or 3 (gather), got 7",
    (3, 8, 8, 2, 9): "pull runs per lane must be in [0, 4], got 9",
    (3, 8, 8, 2, 3): "pull runs per lane (FLOWDCN_MSDCN_PULL_VEC) 3 must divide C/8 = 8",
    (1, 0, 8, 2, 0): "tile must be >= 1x1 and <= 4096 queries, got 0x8",
}
for args, want in cases.items():
    try:
        mod.backward(torch.randn_like(v), v, o, e, w, e, e, e, False, False, *launch, *args)
    except RuntimeError as exc:
        assert want in str(exc), (args, str(exc)[:300])
    else:
        raise AssertionError(f"no error for {args}")
print("ok", len(cases))
"""


@cuda
def test_launcher_checks_raise_with_numbers_in_the_message(cuda_mod):
    """The launchers' own checks raise RuntimeError with their numbers in the text, in a child process: on the GPU
    machine a TORCH_CHECK formatting a number killed the process (SIGSEGV) before errmsg() built the messages."""
    import sys

    res = subprocess.run([sys.executable, "-c", _LAUNCHER_ERRORS], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-1500:]}"
    assert res.stdout.strip() == "ok 4"


def test_pull_width_switch_is_validated(monkeypatch):
    """The pull-width switch (read per call, no GPU needed): auto -> 0, a divisor of C/8 -> itself, else a ValueError."""
    from cuda_ext.msdcn import cuda as cuda_backend

    var = "FLOWDCN_MSDCN_PULL_VEC"
    monkeypatch.delenv(var, raising=False)
    assert cuda_backend._pull_runs(72) == 0
    for value, C, want in (("auto", 64, 0), ("3", 72, 3), ("1", 72, 1), ("4", 64, 4), ("2", 64, 2)):
        monkeypatch.setenv(var, value)
        assert cuda_backend._pull_runs(C) == want, (value, C)
    for value, C, msg in (("3", 64, "must divide C/8 = 8"), ("2", 72, "must divide C/8 = 9"), ("7", 72, "must be one of"),
                          ("0", 72, "must be one of")):
        monkeypatch.setenv(var, value)
        with pytest.raises(ValueError, match=msg):
            cuda_backend._pull_runs(C)


def test_plane_decision_under_torch_compile(monkeypatch):
    """msdcn_deform_packed asks whether the plane backward serves (then the training forward does not bucket the points).
    The rule is shape arithmetic, so torch.compile(fullgraph=True) traces it with static and with dynamic shapes, and
    decides as eager does: XL 16^2 at batch 32 yes; 32^2 no (shared memory); batch 2 no (fewer blocks than half the
    SMs); off with FLOWDCN_MSDCN_PLANE=off; unknown device no. No GPU needed: an H200's limits are filled in."""
    from cuda_ext.msdcn import cuda as cuda_backend

    monkeypatch.setitem(cuda_backend._PLANE_LIMITS, 0, (232448, 132))
    monkeypatch.delenv("FLOWDCN_MSDCN_PLANE", raising=False)

    def f(x, device):
        B, H, W = x.shape[:3]
        return x * 2 if cuda_backend._plane_rule(B, H, W, 16, 72, 9, torch.bfloat16, device) else x + 1

    cases = (((32, 16, 16), 0, True), ((32, 32, 32), 0, False), ((2, 16, 16), 0, False), ((32, 20, 20), 0, True),
             ((32, 16, 16), 3, False))
    for dynamic in (None, False, True):
        torch._dynamo.reset()
        g = f if dynamic is None else torch.compile(f, fullgraph=True, dynamic=dynamic, backend="eager")
        for shape, device, want in cases:
            y = g(torch.full((*shape, 1), 3.0), device)
            assert y.flatten()[0].item() == (6.0 if want else 4.0), (dynamic, shape, device)
    monkeypatch.setenv("FLOWDCN_MSDCN_PLANE", "off")
    assert not cuda_backend._plane_rule(32, 16, 16, 16, 72, 9, torch.bfloat16, 0)
    torch._dynamo.reset()


def test_plane_bytes_match_the_kernels_layout(emu_harness, tmp_path):
    """cuda.py's shared-memory size of a plane-backward block equals the C++ layout's (plane_layout, as the emulation
    harness prints it) for fp64, fp32 and bf16 values, K = 9 and 5, C = 24 and 72."""
    from cuda_ext.msdcn import cuda as cuda_backend

    for shape, dtype, itemsize, acc in (((1, 5, 7, 1, 24, 9), "f64", 8, 8), ((1, 6, 4, 1, 72, 5), "f32", 4, 4),
                                        ((1, 5, 7, 1, 72, 9), "bf16", 2, 4)):
        B, H, W, G, C, K = shape
        value, offsets, weights = make_inputs(shape, seed=5, device="cpu")
        tensors = {"value": value, "off": offsets, "weight": weights, "gout": value}
        run_emulated(emu_harness, tmp_path, tensors, 6, False, "floor", shape, q=32, dtype=dtype)
        assert f"plane backward {cuda_backend._plane_backward_bytes(H, W, C, K, itemsize, acc)} bytes" in LAST_STDOUT[0], \
            (shape, dtype, LAST_STDOUT[0])


# ---------------------------------------------------------------- tiled backward (shared-memory grad_value window)
@pytest.fixture
def tiled(cuda_mod):
    """Yields set_tiled; restores the module's tiled-backward switch, tile, radius and mode afterwards."""
    saved = (cuda_mod._TILED_BWD, list(cuda_mod._TILE), cuda_mod._TILE_RADIUS, cuda_mod._TILED_MODE)
    yield cuda_mod.set_tiled
    cuda_mod.set_tiled(saved[0], tile=saved[1], radius=saved[2], mode=saved[3])


TILED_MODES = ("sort", "atomic")


# (tile, radius): square and ragged tiles, no halo (most corners outside the window), a wide halo.
TILINGS = [((8, 8), 3), ((4, 16), 1), ((3, 5), 0), ((8, 8), 6)]


@cuda
@pytest.mark.parametrize("mode", TILED_MODES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("tile,radius", TILINGS)
def test_tiled_backward_fp64_matches_reference(cuda_mod, tiled, tile, radius, rounding, mode):
    """Grids not a multiple of the tile, offsets up to ~10 px: corners inside and outside the window and the grid."""
    tiled(True, tile=tile, radius=radius, mode=mode)
    shape = (2, 19, 23, 3, 24, 5)  # C=24: 3 lanes per query, 64 queries per round (one round per 8x8 tile)
    value, offsets, weights = make_inputs(shape, seed=71, spread=4.0)
    check_backward_fp64(value, offsets, weights, rounding)


@cuda
@pytest.mark.parametrize("mode", TILED_MODES)
@pytest.mark.parametrize("tile,radius", [((8, 8), 3), ((2, 3), 0)])
def test_tiled_deform_fp64_grads(cuda_mod, tiled, tile, radius, mode):
    """Fused field: grads of value, delta, scale_logit, weights and s0 (block-reduced per tile) against the reference."""
    tiled(True, tile=tile, radius=radius, mode=mode)
    shape = (2, 11, 13, 3, 72, 9)
    inputs = make_deform(shape, seed=73)
    a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    b = [t.cpu().clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    gy = torch.randn(shape[:5], dtype=torch.float64)
    poison_allocator()
    (cuda_mod.msdcn_deform(*a) * gy.cuda()).sum().backward()
    value, delta, scale, weights, prior, s0, s_max = b
    (msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights) * gy).sum().backward()
    for name, i in (("value", 0), ("delta", 1), ("scale_logit", 2), ("weights", 3), ("s0", 5)):
        assert torch.isfinite(a[i].grad).all(), name
        assert rel_err(a[i].grad.cpu(), b[i].grad) < 1e-10, name


@cuda
@pytest.mark.parametrize("mode", TILED_MODES)
@pytest.mark.parametrize("field_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("C", [72, 64])
def test_tiled_bf16_equals_untiled(cuda_mod, tiled, field_dtype, C, mode):
    """bf16 value (XL and B channel counts): tiled and untiled grads agree to fp32 summation order, both near fp64."""
    shape = (2, 20, 18, 4, C, 9)
    inputs = make_deform(shape, dtype=torch.bfloat16, field_dtype=field_dtype, seed=79)
    gy = torch.randn(shape[:5]).to(torch.bfloat16).cuda()
    grads = {}
    for on in (False, True):
        tiled(on, tile=(8, 8), radius=3, mode=mode)
        a = [t.clone().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
        torch.autograd.backward(cuda_mod.msdcn_deform(*a), gy)
        grads[on] = [a[i].grad for i in (0, 1, 2, 3, 5)]
    b = [t.cpu().double().requires_grad_(i in (0, 1, 2, 3, 5)) for i, t in enumerate(inputs)]
    value, delta, scale, weights, prior, s0, s_max = b
    (msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights) * gy.cpu().double()).sum().backward()
    for name, j, i in (("value", 0, 0), ("delta", 1, 1), ("scale_logit", 2, 2), ("weights", 3, 3), ("s0", 4, 5)):
        assert grads[True][j].dtype == inputs[i].dtype, name
        assert rel_err(grads[True][j], grads[False][j]) < 1e-2, name  # one bf16 rounding of grads summed in another order
        assert rel_err(grads[True][j].cpu(), b[i].grad) < 2e-2, name


# ---------------------------------------------------------------- the packed projection (msdcn_deform_packed)
def pack(value, delta, scale, weights):
    """proj [B,H,W,G*C + 4*G*K]: value | delta | scale_logit | weights per pixel (the layout of reference.split_packed)."""
    return torch.cat([value.flatten(-2), delta.flatten(-3), scale.flatten(-2), weights.flatten(-2)], -1).contiguous()


@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("kind", ["gather", "plane"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 2, 24, 9), (1, 9, 4, 3, 72, 9), (3, 1, 6, 1, 16, 2), (2, 6, 5, 4, 64, 3)])
def test_packed_fp64_forward_and_grads(cuda_mod, backward_kind, shape, rounding, kind):
    """The packed kernels (value and fields read in place from one projection, its grad written in place) against the
    fp64 reference; the grad of proj comes from the kernels (packed_served) and every element of it is written."""
    backward_kind(kind)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, seed=229)
    assert cuda_mod.packed_served((B, H, W, G * C + 4 * G * K), G, K, torch.float64)
    assert cuda_mod._module().plane_serves(B, H, W, G, C, K, 8, True, torch.cuda.current_device(), True) == (kind == "plane")
    proj = pack(value, delta, scale, weights).requires_grad_(True)
    z = s0.clone().requires_grad_(True)
    gy = torch.randn(shape[:5], dtype=torch.float64, device="cuda")
    poison_allocator()
    out = cuda_mod.msdcn_deform_packed(proj, prior, z, s_max, groups=G, points=K, rounding=rounding)
    (out * gy).sum().backward()
    b = [t.cpu().clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    ref = msdcn_ref(b[0], deform_offsets_ref(b[1], b[2], prior.cpu(), b[4], s_max.cpu()), b[3], rounding)
    (ref * gy.cpu()).sum().backward()
    assert rel_err(out.detach().cpu(), ref.detach()) < 1e-12
    assert torch.isfinite(proj.grad).all()
    assert rel_err(proj.grad.cpu(), pack(*(t.grad for t in b[:4]))) < 1e-10
    assert rel_err(z.grad.cpu(), b[4].grad) < 1e-10


@cuda
@pytest.mark.parametrize("kind", ["gather", "plane"])
def test_packed_gradcheck_fp64(cuda_mod, backward_kind, kind):
    backward_kind(kind)
    value, delta, scale, weights, prior, s0, s_max = make_deform((1, 3, 4, 2, 8, 2), seed=233)
    args = [pack(value, delta, scale, weights).requires_grad_(True), s0.requires_grad_(True)]
    fn = lambda pj, z: cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=2, points=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)


@cuda
@pytest.mark.parametrize("kind", ["gather", "scatter", "plane"])
def test_packed_bf16_equals_the_unpacked_op(cuda_mod, backward_kind, kind):
    """The training case (bf16 projection, XL's G=16, C=72, K=9): the packed op's output equals the unpacked op's on the
    four parts bit for bit and its grads match (grad_value's sums run in atomic order); with the scatter backward
    selected, packed_served is false and the unpacked op on copies runs (same results)."""
    backward_kind(kind)
    shape = (2, 8, 10, 16, 72, 9)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, dtype=torch.bfloat16, field_dtype=torch.bfloat16, seed=239)
    assert cuda_mod.packed_served((B, H, W, G * C + 4 * G * K), G, K, torch.bfloat16) == (kind != "scatter")
    proj = pack(value, delta, scale, weights).requires_grad_(True)
    z1, z2 = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    parts = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights)]
    gy = torch.randn(shape[:5], device="cuda").to(torch.bfloat16)
    out = cuda_mod.msdcn_deform_packed(proj, prior, z1, s_max, groups=G, points=K)
    ref = cuda_mod.msdcn_deform(*parts[:4], prior, z2, s_max)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    torch.autograd.backward(out, gy)
    torch.autograd.backward(ref, gy)
    assert proj.grad.dtype == torch.bfloat16 and torch.isfinite(proj.grad).all()
    want = pack(*(t.grad for t in parts))
    GC = G * C
    assert rel_err(proj.grad[..., :GC], want[..., :GC]) < 1e-2   # grad_value: one bf16 rounding of sums in another order
    assert torch.equal(proj.grad[..., GC:], want[..., GC:])      # field grads: same kernels, same order
    assert rel_err(z1.grad, z2.grad) < 1e-6


@cuda
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_packed_training_forward_bucketing(cuda_mod, backward_kind, rounding):
    """The training forward buckets the points for the backward (count per (cell, group), key and rank per point): its
    output equals the plain forward's, the counts add up to the points with a corner inside the grid, every rank is a
    distinct slot of its bucket, and the backward from this bucketing equals the backward that counts for itself."""
    backward_kind("gather")
    shape = (2, 7, 6, 3, 16, 9)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, seed=251)
    proj = pack(value * 1, delta * 4, scale, weights)   # wide offsets: many points outside the grid, some buckets shared
    args = (proj, prior, s0, s_max, G, C, K, rounding)
    out, counts = torch.ops.flowdcn.msdcn_deform_packed_cuda_train(*args)
    assert torch.equal(out, torch.ops.flowdcn.msdcn_deform_packed_cuda(*args))
    NB, items = B * (H + 1) * (W + 1) * G, B * H * W * G * K
    assert counts.dtype == torch.int32 and counts.numel() == NB + 2 * items
    count, key, rank = counts[:NB].long(), counts[NB:NB + items].long(), counts[NB + items:].long()
    offsets = deform_offsets_ref(delta * 4, scale, prior, s0, s_max).cpu()
    rnd = torch.floor if rounding == "floor" else torch.trunc
    x0 = rnd(torch.arange(W, dtype=torch.float64).view(1, 1, W, 1, 1) + offsets[..., 0])
    y0 = rnd(torch.arange(H, dtype=torch.float64).view(1, H, 1, 1, 1) + offsets[..., 1])
    inside = ((x0 >= -1) & (x0 <= W - 1) & (y0 >= -1) & (y0 <= H - 1)).flatten()
    assert ((key >= 0).cpu() == inside).all() and inside.any() and not inside.all()
    assert count.sum().item() == inside.sum().item()
    k, r = key[key >= 0], rank[key >= 0]
    assert (r < count[k]).all()
    assert torch.unique(k * items + r).numel() == k.numel()          # (bucket, rank) pairs are distinct
    gy = torch.randn(shape[:5], dtype=torch.float64, device="cuda")
    a = torch.ops.flowdcn.msdcn_deform_packed_cuda_backward(gy, *args, counts)
    b = torch.ops.flowdcn.msdcn_deform_packed_cuda_backward(gy, *args, None)
    assert rel_err(a[0], b[0]) < 1e-12 and rel_err(a[1], b[1]) < 1e-12
    with pytest.raises(RuntimeError, match="bucketing must be"):
        torch.ops.flowdcn.msdcn_deform_packed_cuda_backward(gy, *args, counts[1:])


@cuda
def test_packed_fallback_and_inference_path(cuda_mod, backward_kind, monkeypatch):
    """Rows that are not 16-byte multiples (bf16, G*K odd) take the unpacked op on copies, with the same results; under
    no_grad the packed op runs the plain forward (no bucketing), although s0 is a parameter that requires grad."""
    backward_kind("gather")
    shape = (2, 5, 6, 1, 8, 3)   # R = 8 + 12 = 20 bf16 values = 40 bytes per row
    B, H, W, G, C, K = shape
    inputs = make_deform(shape, dtype=torch.bfloat16, field_dtype=torch.bfloat16, seed=263)
    assert not cuda_mod.packed_served((B, H, W, G * C + 4 * G * K), G, K, torch.bfloat16)
    proj = pack(*inputs[:4]).requires_grad_(True)
    parts = [t.clone().requires_grad_(True) for t in inputs[:4]]
    out = cuda_mod.msdcn_deform_packed(proj, *inputs[4:], groups=G, points=K)
    ref = cuda_mod.msdcn_deform(*parts, *inputs[4:])
    assert torch.equal(out, ref)
    gy = torch.randn(shape[:5], device="cuda").to(torch.bfloat16)
    torch.autograd.backward(out, gy)
    torch.autograd.backward(ref, gy)
    want = pack(*(t.grad for t in parts))
    assert rel_err(proj.grad[..., G * C:], want[..., G * C:]) < 1e-6 and rel_err(proj.grad, want) < 1e-2

    def no_bucketing(*args, **kwargs):
        raise AssertionError("the training forward ran under no_grad")

    shape = (1, 4, 5, 2, 16, 9)
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, dtype=torch.float32, seed=269)
    pj, z = pack(value, delta, scale, weights).requires_grad_(True), s0.clone().requires_grad_(True)
    want = cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=2, points=9)
    monkeypatch.setattr(cuda_mod, "_packed_forward_train_prepped", no_bucketing)
    with torch.no_grad():
        assert torch.equal(cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=2, points=9), want)
    with torch.inference_mode():
        assert torch.equal(cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=2, points=9), want)
    with pytest.raises(AssertionError, match="training forward ran"):
        cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=2, points=9)   # with grad: it does bucket


@cuda
@pytest.mark.parametrize("kind", ["gather", "plane"])
def test_packed_compile_opcheck_and_errors(cuda_mod, backward_kind, kind):
    """torch.compile(fullgraph) through the packed op matches eager (with the plane kernels forced: the forward does not
    bucket, the decision taken at trace time); opcheck of both packed ops; a proj whose last dimension is not
    G*C + 4*G*K is rejected naming proj, before any kernel runs; B = 0 gives an empty grad."""
    backward_kind(kind)
    shape = (2, 6, 6, 2, 16, 9)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, dtype=torch.float32, seed=241)
    lin = torch.nn.Linear(G * C, 32).cuda()

    def block(pj, z):
        y = cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=G, points=K)
        return lin(y.flatten(-2)).square().mean()

    proj = pack(value, delta, scale, weights)
    a = [proj.clone().requires_grad_(True), s0.clone().requires_grad_(True)]
    c = [proj.clone().requires_grad_(True), s0.clone().requires_grad_(True)]
    block(*a).backward()
    torch._dynamo.reset()
    torch.compile(block, fullgraph=True)(*c).backward()
    for ta, tc in zip(a, c):
        assert rel_err(tc.grad, ta.grad) < 1e-5
    small = make_deform((1, 4, 5, 2, 16, 3), seed=243)
    pj = pack(*small[:4]).requires_grad_(True)
    args = (pj, small[4], small[5].requires_grad_(True), small[6], 2, 16, 3, "floor")
    torch.library.opcheck(torch.ops.flowdcn.msdcn_deform_packed_cuda.default, args)
    # The training op's second output (the bucketing) holds ranks in atomic order, different on every call: opcheck's
    # AOT test compares outputs of two calls, so it runs the other three checks (test_packed_training_forward_bucketing
    # checks the bucketing itself, and the compiled block above runs the op under AOTAutograd).
    torch.library.opcheck(torch.ops.flowdcn.msdcn_deform_packed_cuda_train.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with pytest.raises(ValueError, match="proj's last dimension"):
        cuda_mod.msdcn_deform_packed(proj[..., 1:], prior, s0, s_max, groups=G, points=K)
    empty = torch.zeros(0, H, W, proj.shape[-1], device="cuda", requires_grad=True)
    out = cuda_mod.msdcn_deform_packed(empty, prior, s0, s_max, groups=G, points=K)
    assert out.shape == (0, H, W, G, C)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@cuda
def test_plane_kernels_at_the_training_shape(cuda_mod, monkeypatch):
    """FlowDCN-XL/2 at 256 px (B=32, 16x16 tokens, G=16, C=72, K=9, bf16 projection): with the default switch the plane
    kernels serve, so the training forward does not bucket the points; the plane forward and backward agree with the
    regular forward and the gather backward (FLOWDCN_MSDCN_PLANE=off) up to fp32 summation order and bf16 rounding."""
    shape = (32, 16, 16, 16, 72, 9)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, dtype=torch.bfloat16, field_dtype=torch.bfloat16, seed=401)
    proj = pack(value, delta, scale, weights)
    gy = torch.randn(shape[:5], device="cuda").to(torch.bfloat16)
    monkeypatch.setenv("FLOWDCN_MSDCN_PLANE", "on")
    assert cuda_mod._plane_backward_serves(proj, G, C, K)
    dev = torch.cuda.current_device()
    for b, h, w, g, c, k, dt in ((32, 16, 16, 16, 72, 9, torch.bfloat16), (32, 23, 23, 16, 72, 9, torch.bfloat16),
                                 (32, 24, 24, 16, 72, 9, torch.bfloat16), (32, 32, 32, 16, 72, 9, torch.bfloat16),
                                 (2, 16, 16, 16, 72, 9, torch.bfloat16), (32, 16, 16, 12, 64, 9, torch.float32),
                                 (8, 9, 11, 4, 24, 5, torch.float64), (64, 60, 60, 1, 8, 1, torch.float16)):
        # cuda.py's rule (shape arithmetic, traceable) agrees with the extension's (plane_serves)
        want = cuda_mod._module().plane_serves(b, h, w, g, c, k, dt.itemsize, dt == torch.float64, dev, True)
        assert cuda_mod._plane_rule(b, h, w, g, c, k, dt, dev) == want, (b, h, w, g, c, k, dt)

    def run():
        pj, z = proj.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        out = cuda_mod.msdcn_deform_packed(pj, prior, z, s_max, groups=G, points=K)
        torch.autograd.backward(out, gy)
        return out, pj.grad, z.grad

    def no_bucketing(*args, **kwargs):
        raise AssertionError("the training forward bucketed the points although the plane backward serves")

    with monkeypatch.context() as m:
        m.setattr(cuda_mod, "_packed_forward_train_prepped", no_bucketing)
        out_p, gp_p, gz_p = run()
    monkeypatch.setenv("FLOWDCN_MSDCN_PLANE", "off")
    assert not cuda_mod._plane_backward_serves(proj, G, C, K)
    out_g, gp_g, gz_g = run()
    assert torch.isfinite(gp_p).all()
    assert rel_err(out_p.float(), out_g.float()) < 1e-3
    GC = G * C
    assert rel_err(gp_p[..., :GC].float(), gp_g[..., :GC].float()) < 1e-2   # grad_value: bf16 sums in other orders
    assert rel_err(gp_p[..., GC:].float(), gp_g[..., GC:].float()) < 1e-2   # field grads: dots summed in another order
    assert rel_err(gz_p, gz_g) < 1e-4


# ---------------------------------------------------------------- backward kernels under CPU emulation (no GPU)
EMU_DIR = Path(__file__).resolve().parents[2] / "cuda_ext" / "msdcn" / "csrc" / "emu"


@pytest.fixture(scope="module")
def emu_harness(tmp_path_factory):
    """csrc/emu/harness.cpp built with g++: the backward and forward kernels, one std::thread per CUDA thread."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not installed")
    exe = tmp_path_factory.mktemp("emu") / "harness"
    cmd = [gxx, "-std=c++20", "-O1", "-pthread", f"-I{EMU_DIR}", f"-I{EMU_DIR.parent}", str(EMU_DIR / "harness.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


LAST_STDOUT = [""]   # the harness's stdout of the last run_emulated call


def run_emulated(exe, tmp, tensors, mode, fused, rounding, shape, tile=(8, 8), radius=2, split=True, q=2, rounds=3, dtype="f64",
                 vec=0, outputs=True):
    """Write the inputs (as fp64), run the harness's kernels in dtype, return (g_value, g_off, g_weight, g_scale, s0 sums).

    vec: runs of 8 channels per lane of the gather pull (mode 3); 0 = the launcher's choice (always 1 in fp64).
    """
    B, H, W, G, C, K = shape
    for name, t in tensors.items():
        t.double().contiguous().numpy().tofile(tmp / f"{name}.bin")
    args = [exe, tmp, mode, int(fused), int(rounding == "trunc"), int(split), B, H, W, G, C, K, *tile, radius, q, rounds, dtype, vec]
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    LAST_STDOUT[0] = res.stdout
    if mode in (3, 5) and vec:  # the pull ran with the width asked for (not the automatic one)
        assert f"runs {vec}\n" in res.stdout, res.stdout
    if not outputs:  # the forward (mode 4) writes out.bin only
        return None

    def read(name, shp):
        return torch.from_numpy(np.fromfile(tmp / f"{name}.bin", dtype=np.float64)).view(*shp)

    return (read("gvalue", (B, H, W, G, C)), read("goff", (B, H, W, G, K, 2)), read("gweight", (B, H, W, G, K)),
            read("gscale", (B, H, W, G, K)), read("s0p", (-1, G)).sum(0))


# (mode, tile, radius, split): mode 0 = untiled scatter (checks the emulation itself), 1 = tiled atomic, 2 = tiled
# sorted, 3 = gather (tile and radius unused; split picks the pull's block order: True group-major, False pixel-major).
EMU_CASES = [(0, (8, 8), 0, True), (1, (8, 8), 2, True), (2, (8, 8), 2, True), (2, (3, 5), 0, False), (1, (4, 16), 1, False),
             (2, (2, 3), 6, True), (3, (8, 8), 0, True), (3, (8, 8), 0, False)]


@pytest.mark.parametrize("C,vec", [(24, 1), (24, 3), (48, 2), (64, 4), (64, 2)])
def test_emulated_gather_pull_runs_per_lane(emu_harness, tmp_path, C, vec):
    """The gather pull with V runs of 8 channels per lane (C/(8V) lanes per pixel, 1 to 8 of them) in fp64, both block
    orders, against the reference: every lane-to-channel mapping and dot-reduction width the launcher can pick."""
    shape = (2, 7, 9, 2, C, 5)
    value, offsets, weights = make_inputs(shape, seed=101 + C + vec, spread=3.0, device="cpu")
    grad = torch.randn_like(value)
    want = msdcn_ref_backward(grad, value, offsets, weights, "floor")
    tensors = {"value": value, "off": offsets, "weight": weights, "gout": grad}
    for split in (True, False):
        got = run_emulated(emu_harness, tmp_path, tensors, 3, False, "floor", shape, split=split, vec=vec)
        for name, g, w in zip(("value", "offsets", "weights"), got, want):
            assert torch.isfinite(g).all(), (split, name)
            assert rel_err(g, w) < 1e-11, (split, name)


@pytest.mark.parametrize("C,fused", [(72, True), (72, False), (64, True), (24, False)])
def test_emulated_forward_matches_reference(emu_harness, tmp_path, C, fused):
    """The forward kernel, 2 queries x 3 rounds per block, in fp64 against the reference, fused and plain."""
    shape = (2, 5, 7, 2, C, 9 if fused else 5)
    B, H, W, G, _, K = shape
    if fused:
        value, delta, scale, weights, prior, s0, s_max = make_deform(shape, seed=7 + C, device="cpu")
        want = msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights)
        tensors = {"value": value, "off": delta, "weight": weights, "gout": value, "scale": scale, "prior": prior, "s0": s0,
                   "smax": s_max}
    else:
        value, offsets, weights = make_inputs(shape, seed=7 + C, spread=3.0, device="cpu")
        want = msdcn_ref(value, offsets, weights)
        tensors = {"value": value, "off": offsets, "weight": weights, "gout": value}
    run_emulated(emu_harness, tmp_path, tensors, 4, fused, "floor", shape, q=2, rounds=3, outputs=False)
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_emulated_forward_low_precision(emu_harness, tmp_path, dtype):
    """The fused forward with fp32 values and with bf16 values held as loaded (Raw8, unpacked where used; the training
    case), fp32 fields, against the fp64 reference on the same rounded value: bf16 out is one rounding (<= 2^-9)."""
    shape = (2, 6, 5, 2, 72, 9)
    B, H, W, G, C, K = shape
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, seed=31, device="cpu")
    if dtype == "bf16":
        value = value.to(torch.bfloat16).double()
    want = msdcn_ref(value, deform_offsets_ref(delta, scale, prior, s0, s_max), weights)
    tensors = {"value": value, "off": delta, "weight": weights, "gout": value, "scale": scale, "prior": prior, "s0": s0,
               "smax": s_max}
    run_emulated(emu_harness, tmp_path, tensors, 4, True, "floor", shape, q=3, rounds=2, dtype=dtype, outputs=False)
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < (3e-3 if dtype == "bf16" else 1e-5)
    if dtype == "bf16":  # and not exact by accident: the fp64 sum, rounded once, is what came back
        assert rel_err(got, want.to(torch.bfloat16).double()) < 1e-3


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_emulated_tiled_backward_matches_reference(emu_harness, tmp_path, rounding):
    """Tiles and halos of all kinds on a 19x23 grid with offsets up to ~10 px (in and out of window and grid)."""
    shape = (2, 19, 23, 2, 24, 5)
    value, offsets, weights = make_inputs(shape, seed=83, spread=4.0, device="cpu")
    grad = torch.randn_like(value)
    want = msdcn_ref_backward(grad, value, offsets, weights, rounding)
    tensors = {"value": value, "off": offsets, "weight": weights, "gout": grad}
    for mode, tile, radius, split in EMU_CASES:
        got = run_emulated(emu_harness, tmp_path, tensors, mode, False, rounding, shape, tile, radius, split)
        for name, g, w in zip(("value", "offsets", "weights"), got, want):
            assert torch.isfinite(g).all(), (mode, tile, radius, name)
            assert rel_err(g, w) < 1e-11, (mode, tile, radius, name)


def emulated_deform_case(shape, seed):
    """Fused-op inputs for the harness (as fp64 files) and the reference: (tensors, leaves with .grad, reference out)."""
    value, delta, scale, weights, prior, s0, s_max = make_deform(shape, seed=seed, device="cpu")
    grad = torch.randn_like(value)
    leaves = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    out = msdcn_ref(leaves[0], deform_offsets_ref(leaves[1], leaves[2], prior, leaves[4], s_max), leaves[3])
    (out * grad).sum().backward()
    tensors = {"value": value, "off": delta, "weight": weights, "gout": grad, "scale": scale, "prior": prior, "s0": s0, "smax": s_max}
    return tensors, leaves, out.detach()


def test_emulated_tiled_deform_backward_matches_reference(emu_harness, tmp_path):
    """Fused field at C=72, K=9 (two rounds of 32 queries per 8x8 tile): all grads, d/ds0 from the block partials."""
    shape = (1, 11, 13, 2, 72, 9)
    tensors, leaves, _ = emulated_deform_case(shape, seed=89)
    # mode 3 twice: the pull with 1 and with 3 runs of 8 channels per lane (9 and 3 lanes per pixel)
    for mode, tile, radius, vec in ((0, (8, 8), 0, 0), (2, (8, 8), 2, 0), (1, (8, 8), 2, 0), (2, (5, 4), 0, 0), (3, (8, 8), 0, 1),
                                    (3, (8, 8), 0, 3), (5, (8, 8), 0, 3)):
        gv, gd, gw, gs, gs0 = run_emulated(emu_harness, tmp_path, tensors, mode, True, "floor", shape, tile, radius, q=1, rounds=2,
                                           vec=vec)
        for name, g, leaf in (("value", gv, 0), ("delta", gd, 1), ("weights", gw, 3), ("scale_logit", gs, 2), ("s0", gs0, 4)):
            assert torch.isfinite(g).all(), (mode, vec, name)
            assert rel_err(g, leaves[leaf].grad) < 1e-10, (mode, tile, radius, vec, name)


def test_emulated_packed_layout_matches_reference(emu_harness, tmp_path, monkeypatch):
    """The packed layout (value and the fields read from one [N, G*C + 4*G*K] array at its row stride, the field grads and
    the gather backward's grad_value written into one such array): forward, gather (both pull widths; and from the
    training forward's bucketing), scatter and tiled backward in fp64 against the reference; an element no kernel writes
    stays NaN and fails the finiteness check."""
    monkeypatch.setenv("FLOWDCN_EMU_PACKED", "1")
    shape = (2, 5, 7, 2, 24, 9)
    B, H, W, G, C, K = shape
    tensors, leaves, out = emulated_deform_case(shape, seed=211)
    run_emulated(emu_harness, tmp_path, tensors, 4, True, "floor", shape, q=2, rounds=2, outputs=False)
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert rel_err(got, out) < 1e-12
    # mode 5: the training forward buckets the points, the gather backward starts from its bucketing (no count kernel)
    for mode, tile, radius, vec in ((3, (8, 8), 0, 1), (3, (8, 8), 0, 3), (5, (8, 8), 0, 3), (0, (8, 8), 0, 0), (2, (4, 4), 1, 0)):
        gv, gd, gw, gs, gs0 = run_emulated(emu_harness, tmp_path, tensors, mode, True, "floor", shape, tile, radius, q=1, rounds=2,
                                           vec=vec)
        if mode == 5:
            got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
            assert rel_err(got, out) < 1e-12
        for name, g, leaf in (("value", gv, 0), ("delta", gd, 1), ("weights", gw, 3), ("scale_logit", gs, 2), ("s0", gs0, 4)):
            assert torch.isfinite(g).all(), (mode, vec, name)
            assert rel_err(g, leaves[leaf].grad) < 1e-10, (mode, vec, name)


@pytest.mark.parametrize("path", ["gather", "plane"])
def test_emulated_packed_bf16_projection(emu_harness, tmp_path, monkeypatch, path):
    """The model's case: one bf16 projection (bf16 value and fields, read in place) and bf16 grad_out; gather: the
    training forward bucketing the points, then the gather backward; plane: the plane forward and backward (the planes
    held as bf16). Against fp64 on the same rounded inputs: bf16 outputs and grads are one rounding of fp32 sums (<= 2^-9
    relative each); d/ds0 stays fp32."""
    monkeypatch.setenv("FLOWDCN_EMU_PACKED", "1")
    shape = (1, 6, 7, 2, 72, 9) if path == "gather" else (2, 5, 6, 2, 72, 9)
    B, H, W, G, C, K = shape
    inputs = list(make_deform(shape, seed=257 if path == "gather" else 409, device="cpu"))
    for i in range(4):
        inputs[i] = inputs[i].to(torch.bfloat16).double()
    value, delta, scale, weights, prior, s0, s_max = inputs
    grad = torch.randn_like(value).to(torch.bfloat16).double()
    leaves = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    out = msdcn_ref(leaves[0], deform_offsets_ref(leaves[1], leaves[2], prior, leaves[4], s_max), leaves[3])
    (out * grad).sum().backward()
    tensors = {"value": value, "off": delta, "weight": weights, "gout": grad, "scale": scale, "prior": prior, "s0": s0, "smax": s_max}
    if path == "gather":
        got = run_emulated(emu_harness, tmp_path, tensors, 5, True, "floor", shape, q=1, rounds=2, dtype="bf16x")
    else:
        run_emulated(emu_harness, tmp_path, tensors, 7, True, "floor", shape, q=64, dtype="bf16x", outputs=False)
    y = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert rel_err(y, out.detach()) < 3e-3
    if path == "plane":
        got = run_emulated(emu_harness, tmp_path, tensors, 6, True, "floor", shape, q=64, dtype="bf16x")
    for name, g, leaf, tol in (("value", got[0], 0, 3e-3), ("delta", got[1], 1, 3e-3), ("weights", got[2], 3, 3e-3),
                               ("scale_logit", got[3], 2, 3e-3), ("s0", got[4], 4, 1e-4)):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, leaves[leaf].grad) < tol, name


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_emulated_tiled_deform_backward_low_precision(emu_harness, tmp_path, dtype):
    """The fp32 and bf16-value/fp32-field kernels (the training case) against fp64 grads of the same rounded inputs."""
    shape = (1, 10, 12, 2, 72, 9)
    inputs = list(make_deform(shape, seed=97, device="cpu"))
    if dtype == "bf16":
        inputs[0] = inputs[0].to(torch.bfloat16).double()  # value is bf16 in the kernel: compare on the rounded value
    value, delta, scale, weights, prior, s0, s_max = inputs
    grad = torch.randn_like(value)
    if dtype == "bf16":
        grad = grad.to(torch.bfloat16).double()
    leaves = [t.clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    out = msdcn_ref(leaves[0], deform_offsets_ref(leaves[1], leaves[2], prior, leaves[4], s_max), leaves[3])
    (out * grad).sum().backward()
    tensors = {"value": value, "off": delta, "weight": weights, "gout": grad, "scale": scale, "prior": prior, "s0": s0, "smax": s_max}
    for mode, tile, radius in ((0, (8, 8), 0), (2, (8, 8), 2), (1, (8, 8), 2), (3, (8, 8), 0)):
        got = run_emulated(emu_harness, tmp_path, tensors, mode, True, "floor", shape, tile, radius, q=1, rounds=2, dtype=dtype)
        for name, g, leaf in zip(("value", "delta", "weights", "scale_logit", "s0"), got, (0, 1, 3, 2, 4)):
            assert torch.isfinite(g).all(), (mode, name)
            # fp32 coordinates and sums (~5e-7 seen); the gather kernel writes grad_value in the value's dtype: one
            # bf16 rounding, relative error <= 2^-9 per element
            tol = 2e-3 if (mode == 3 and dtype == "bf16" and name == "value") else 1e-5
            assert rel_err(g, leaves[leaf].grad) < tol, (mode, tile, radius, name)


# ---------------------------------------------------------------- the plane kernels (csrc/msdcn_plane.cuh) under emulation
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("fused,shape,threads", [(True, (2, 6, 7, 2, 72, 9), 96), (False, (2, 5, 9, 3, 24, 5), 64),
                                                 (True, (1, 1, 3, 1, 16, 1), 32), (True, (1, 3, 4, 2, 136, 3), 64),
                                                 (True, (1, 3, 1, 1, 8, 2), 32)])
def test_emulated_plane_backward_and_forward(emu_harness, tmp_path, rounding, fused, shape, threads):
    """The plane kernels (one block per (image, group), the group's planes in shared memory) in fp64 against the
    reference: forward, and every grad of the backward (d/ds0 from the per-(group, image) partials), fused and plain,
    both roundings, blocks of several thread counts (loops with remainders), offsets in and out of the grid; a 1x3
    grid with K = 1; C = 72 and 136 (9 and 17 units: the last unit split channel-wise over the last 8 lanes of a pixel,
    plane_split); a 3x1 grid with C = 8 (FastDiv by 1: W, the lanes per pixel). Unwritten elements are NaN and fail the
    finiteness checks."""
    B, H, W, G, C, K = shape
    if fused:
        tensors, leaves, out = emulated_deform_case(shape, seed=307 + C)
        names = (("value", 0), ("delta", 1), ("weights", 3), ("scale_logit", 2), ("s0", 4))
    else:
        value, offsets, weights = make_inputs(shape, seed=311, spread=3.0, device="cpu")
        grad = torch.randn_like(value)
        leaves = [t.clone().requires_grad_(True) for t in (value, offsets, weights)]
        out = msdcn_ref(*leaves, rounding=rounding)
        (out * grad).sum().backward()
        tensors = {"value": value, "off": offsets, "weight": weights, "gout": grad}
        names = (("value", 0), ("offsets", 1), ("weights", 2))
    if fused and rounding == "trunc":
        leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = msdcn_ref(leaves[0], deform_offsets_ref(leaves[1], leaves[2], tensors["prior"], leaves[4], tensors["smax"]), leaves[3],
                        rounding="trunc")
        (out * tensors["gout"]).sum().backward()
    run_emulated(emu_harness, tmp_path, tensors, 7, fused, rounding, shape, q=threads, outputs=False)
    got = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert torch.isfinite(got).all()
    assert rel_err(got, out.detach()) < 1e-12
    grads = run_emulated(emu_harness, tmp_path, tensors, 6, fused, rounding, shape, q=threads)
    order = (0, 1, 2, 3, 4) if fused else (0, 1, 2)
    for (name, leaf), idx in zip(names, order):
        g = grads[idx]
        assert torch.isfinite(g).all(), name
        assert rel_err(g, leaves[leaf].grad) < 1e-10, name


@pytest.mark.parametrize("C", [24, 72])
def test_emulated_plane_fp32(emu_harness, tmp_path, C):
    """The plane kernels with fp32 values and fields (the fp32 plane rows: two 16-byte shared loads per 8 channels,
    padded row stride; C = 72: the split last unit, C = 24: one lane per 8 channels) against fp64 grads of the same
    inputs."""
    shape = (2, 5, 6, 2, C, 9)
    B, H, W, G, C, K = shape
    tensors, leaves, out = emulated_deform_case(shape, seed=419)
    run_emulated(emu_harness, tmp_path, tensors, 7, True, "floor", shape, q=64, dtype="f32", outputs=False)
    y = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float64)).view(B, H, W, G, C)
    assert torch.isfinite(y).all() and rel_err(y, out) < 1e-5
    got = run_emulated(emu_harness, tmp_path, tensors, 6, True, "floor", shape, q=64, dtype="f32")
    for name, g, leaf in zip(("value", "delta", "weights", "scale_logit", "s0"), got, (0, 1, 3, 2, 4)):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, leaves[leaf].grad) < 1e-5, name
