"""The reference MSDCN op against independent computations (fp64 loops, grid_sample), gradcheck, edge cases."""
import pytest
import torch

from cuda_ext import deform_offsets_ref, msdcn, msdcn_deform, msdcn_deform_packed
from cuda_ext.msdcn.reference import msdcn_grid_sample_ref


def loop_ref(value, offsets, weights, rounding):
    """Scalar fp64 loops straight from the definition (independent of the vectorised reference)."""
    import math

    B, H, W, G, C = value.shape
    K = weights.shape[-1]
    out = torch.zeros(B, H, W, G, C, dtype=torch.float64)
    rnd = math.floor if rounding == "floor" else math.trunc
    v = value.double()
    for b in range(B):
        for h in range(H):
            for w in range(W):
                for g in range(G):
                    for k in range(K):
                        px, py = w + float(offsets[b, h, w, g, k, 0]), h + float(offsets[b, h, w, g, k, 1])
                        x0, y0 = rnd(px), rnd(py)
                        lx, ly = px - x0, py - y0
                        for dx, dy, c in ((0, 0, (1 - lx) * (1 - ly)), (1, 0, lx * (1 - ly)), (0, 1, (1 - lx) * ly), (1, 1, lx * ly)):
                            xi, yi = x0 + dx, y0 + dy
                            if 0 <= xi < W and 0 <= yi < H:
                                out[b, h, w, g] += float(weights[b, h, w, g, k]) * c * v[b, yi, xi, g]
    return out


def rand_inputs(B, H, W, G, C, K, dtype=torch.float64, spread=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(B, H, W, G, C, generator=gen, dtype=torch.float64).to(dtype)
    o = (torch.randn(B, H, W, G, K, 2, generator=gen, dtype=torch.float64) * spread).float()
    w = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64).to(dtype)
    return v, o.double() if dtype == torch.float64 else o, w


@pytest.mark.parametrize("rounding", ["floor", "trunc"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 2, 3, 4), (1, 4, 4, 1, 8, 9), (1, 1, 6, 2, 2, 3)])
def test_matches_scalar_loops(rounding, shape):
    v, o, w = rand_inputs(*shape)
    torch.testing.assert_close(msdcn(v, o, w, rounding=rounding, impl="torch").double(), loop_ref(v, o, w, rounding),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 8, 9), (1, 6, 4, 2, 72, 9), (3, 9, 2, 1, 5, 2)])
def test_floor_matches_grid_sample(shape):
    v, o, w = rand_inputs(*shape, spread=4.0)
    torch.testing.assert_close(msdcn(v, o, w, impl="torch"), msdcn_grid_sample_ref(v, o, w), rtol=1e-10, atol=1e-10)


def test_trunc_border_extrapolation_documented_case():
    # Row [1, 10, 100] sampled at x = −0.5: official trunc gives −3.5, floor (correct) gives 0.5.
    v = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(1, 1, 3, 1, 1)
    w = torch.ones(1, 1, 3, 1, 1, dtype=torch.float64)
    o = torch.zeros(1, 1, 3, 1, 1, 2, dtype=torch.float64)
    o[0, 0, 0, 0, 0, 0] = -0.5
    assert msdcn(v, o, w, rounding="trunc")[0, 0, 0, 0, 0].item() == pytest.approx(-3.5)
    assert msdcn(v, o, w, rounding="floor")[0, 0, 0, 0, 0].item() == pytest.approx(0.5)
    o[0, 0, 0, 0, 0, 0] = -1.5          # trunc: −0.5, floor: 0 (both corners outside)
    assert msdcn(v, o, w, rounding="trunc")[0, 0, 0, 0, 0].item() == pytest.approx(-0.5)
    assert msdcn(v, o, w, rounding="floor")[0, 0, 0, 0, 0].item() == pytest.approx(0.0)


def test_far_out_of_grid_is_zero_and_integer_points_are_exact():
    v, _, w = rand_inputs(1, 4, 5, 2, 3, 2)
    o = torch.full((1, 4, 5, 2, 2, 2), 50.0, dtype=torch.float64)
    assert msdcn(v, o, w).abs().max() == 0
    o = torch.zeros_like(o)
    o[..., 1, 0] = 1.0                  # point 1 samples the right neighbour exactly
    out = msdcn(v, o, w)
    right = torch.cat([v[:, :, 1:], torch.zeros_like(v[:, :, :1])], dim=2)
    torch.testing.assert_close(out, w[..., 0:1] * v + w[..., 1:2] * right)


@pytest.mark.parametrize("rounding", ["floor", "trunc"])
def test_gradcheck(rounding):
    v, o, w = rand_inputs(2, 3, 4, 2, 3, 4)
    o = o + 0.01 * torch.rand_like(o)   # keep away from integer coordinates (kinks)
    args = [t.clone().requires_grad_() for t in (v, o, w)]
    assert torch.autograd.gradcheck(lambda a, b, c: msdcn(a, b, c, rounding=rounding), args)


def test_explicit_backward_equals_autograd_of_composed_reference():
    from cuda_ext.msdcn.reference import msdcn_ref

    v, o, w = rand_inputs(2, 5, 3, 2, 8, 9)
    a = [t.clone().requires_grad_() for t in (v, o, w)]
    b = [t.clone().requires_grad_() for t in (v, o, w)]
    g = torch.randn(2, 5, 3, 2, 8, dtype=torch.float64)
    (msdcn(*a) * g).sum().backward()
    (msdcn_ref(*b) * g).sum().backward()   # plain autograd through the vectorised reference
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_values_fp32_coordinates(dtype, tol):
    v, o, w = rand_inputs(2, 6, 5, 2, 72, 9, dtype=torch.float64, spread=2.0)
    ref = msdcn(v, o, w)
    out = msdcn(v.to(dtype), o.float(), w.to(dtype))
    assert out.dtype == dtype
    err = (out.double() - ref).norm() / ref.norm()
    assert err < tol, err


def test_deform_offsets_formula_and_fused_gradcheck():
    gen = torch.Generator().manual_seed(3)
    B, H, W, G, K, C = 1, 3, 4, 2, 9, 3
    delta = torch.randn(B, H, W, G, K, 2, generator=gen, dtype=torch.float64)
    sl = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64)
    prior = torch.randn(K, 2, generator=gen, dtype=torch.float64)
    s0 = torch.randn(G, generator=gen, dtype=torch.float64)
    smax = torch.tensor([6.0, 3.0], dtype=torch.float64)
    off = deform_offsets_ref(delta, sl, prior, s0, smax)
    g = 1 / (1 + torch.exp(-(sl[0, 1, 2, 1, 4] + s0[1])))
    assert off[0, 1, 2, 1, 4, 0].item() == pytest.approx(((delta[0, 1, 2, 1, 4, 0] + prior[4, 0]) * g * 6).item())
    assert off[0, 1, 2, 1, 4, 1].item() == pytest.approx(((delta[0, 1, 2, 1, 4, 1] + prior[4, 1]) * g * 3).item())
    v = torch.randn(B, H, W, G, C, generator=gen, dtype=torch.float64)
    w = torch.randn(B, H, W, G, K, generator=gen, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (v, delta * 0.3, sl, w, s0)]
    assert torch.autograd.gradcheck(lambda a, d, s, ww, ss: msdcn_deform(a, d, s, ww, prior, ss, smax), args)


def test_bad_shapes_name_the_argument():
    v, o, w = rand_inputs(1, 2, 2, 1, 2, 3)
    with pytest.raises(ValueError, match="offsets"):
        msdcn(v, o[..., :1], w)
    with pytest.raises(ValueError, match="weights"):
        msdcn(v, o, w[:, :1])
    with pytest.raises(ValueError, match="rounding"):
        msdcn(v, o, w, rounding="round")


def test_compile_fullgraph_no_graph_break():
    v, o, w = rand_inputs(1, 3, 3, 2, 4, 3, dtype=torch.float32)
    args = [t.clone().requires_grad_() for t in (v, o, w)]
    f = torch.compile(lambda a, b, c: (msdcn(a, b, c, impl="torch") ** 2).sum(), fullgraph=True, backend="aot_eager")
    f(*args).backward()
    ref = [t.clone().requires_grad_() for t in (v, o, w)]
    (msdcn(*ref, impl="torch") ** 2).sum().backward()
    for a, b in zip(args, ref):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 8, 9), (1, 2, 9, 2, 72, 4), (3, 3, 2, 1, 5, 1)])
def test_grid_sample_fast_path_equals_gather_reference_fwd_and_bwd(shape):
    from cuda_ext.msdcn import fast_torch
    from cuda_ext.msdcn.reference import msdcn_ref, msdcn_ref_backward

    v, o, w = rand_inputs(*shape, spread=4.0, seed=7)
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    torch.testing.assert_close(fast_torch.forward(v, o, w), msdcn_ref(v, o, w), rtol=1e-11, atol=1e-11)
    for a, b in zip(fast_torch.backward(g, v, o, w), msdcn_ref_backward(g, v, o, w)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_op_checks_its_inputs_on_the_torch_path_too():
    v, o, w = rand_inputs(1, 2, 3, 2, 4, 9)
    sl, prior, s0, smax = torch.zeros(1, 2, 3, 2, 9), torch.zeros(9, 2), torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="msdcn_deform: delta must have shape"):
        msdcn_deform(v, o[..., :1], sl, w, prior, s0, smax, impl="torch")
    with pytest.raises(ValueError, match="msdcn_deform: s0 must have shape"):
        msdcn_deform(v, o, sl, w, prior, torch.zeros(3), smax, impl="torch")


def test_packed_projection_layout_and_grads_on_the_torch_path():
    """msdcn_deform_packed reads value | delta | scale_logit | weights from each pixel's row of one projection (slices
    taken here by hand, independently of split_packed) and its grad lands at the same columns; bad widths name proj."""
    gen = torch.Generator().manual_seed(5)
    B, H, W, G, C, K = 2, 3, 4, 2, 3, 5
    GC, GK = G * C, G * K
    proj = torch.randn(B, H, W, GC + 4 * GK, generator=gen, dtype=torch.float64, requires_grad=True)
    prior, s0 = torch.randn(K, 2, generator=gen, dtype=torch.float64), torch.randn(G, generator=gen, dtype=torch.float64)
    smax = torch.tensor([4.0, 2.0], dtype=torch.float64)
    out = msdcn_deform_packed(proj, prior, s0, smax, groups=G, points=K, impl="torch")
    parts = [proj[..., :GC].reshape(B, H, W, G, C), proj[..., GC:GC + 2 * GK].reshape(B, H, W, G, K, 2),
             proj[..., GC + 2 * GK:GC + 3 * GK].reshape(B, H, W, G, K), proj[..., GC + 3 * GK:].reshape(B, H, W, G, K)]
    ref = msdcn_deform(*parts, prior, s0, smax, impl="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out.shape == (B, H, W, G, C)
    gy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (g_packed,) = torch.autograd.grad(out, proj, gy)
    (g_parts,) = torch.autograd.grad(ref, proj, gy)
    torch.testing.assert_close(g_packed, g_parts, rtol=0, atol=0)
    assert g_packed[..., GC + 2 * GK:GC + 3 * GK].abs().sum() > 0   # the scale_logit columns do get a gradient
    with pytest.raises(ValueError, match="proj's last dimension 45 is not G\\*C \\+ 4\\*G\\*K"):
        msdcn_deform_packed(proj[..., 1:], prior, s0, smax, groups=G, points=K, impl="torch")
    with pytest.raises(ValueError, match="msdcn_deform: s0 must have shape"):
        msdcn_deform_packed(proj, prior, s0[:1], smax, groups=G, points=K, impl="torch")


def test_packed_input_checks_without_views():
    """check_packed_inputs (what the CUDA path runs instead of building views) rejects what split_packed and
    check_deform_inputs reject, naming the argument, and returns C."""
    from cuda_ext.msdcn.reference import check_packed_inputs

    G, K, C = 2, 5, 3
    proj = torch.zeros(1, 2, 3, G * C + 4 * G * K)
    prior, s0, smax = torch.zeros(K, 2), torch.zeros(G), torch.ones(2)
    assert check_packed_inputs(proj, prior, s0, smax, G, K, "trunc") == C
    with pytest.raises(ValueError, match="proj's last dimension"):
        check_packed_inputs(proj[..., 1:], prior, s0, smax, G, K, "floor")
    with pytest.raises(ValueError, match="msdcn_deform_packed: prior must have shape \\[5, 2\\]"):
        check_packed_inputs(proj, prior[:4], s0, smax, G, K, "floor")
    with pytest.raises(ValueError, match="msdcn_deform_packed: s0 must have shape \\[2\\]"):
        check_packed_inputs(proj, prior, torch.zeros(3), smax, G, K, "floor")
    with pytest.raises(ValueError, match="msdcn_deform_packed: s_max must have shape \\[2\\]"):
        check_packed_inputs(proj, prior, s0, torch.ones(1), G, K, "floor")
    with pytest.raises(ValueError, match="rounding"):
        check_packed_inputs(proj, prior, s0, smax, G, K, "round")
    with pytest.raises(ValueError, match="proj must be"):
        check_packed_inputs(proj[0], prior, s0, smax, G, K, "floor")
