"""FlowDCN/SiT construction, sizes, shapes, init, S_max handling and policies."""
import math

import pytest
import torch

from modeling import build_model, model_config
from modeling.flowdcn import resolve_smax
from modeling.msdcn import prior_grid
from modeling.smax import ConstantRatioSmaxPolicy, OfficialSmaxPolicy, with_smax_policy

# Official parameter counts (flowdcn.md §1) include the non-trainable 3×3 prior (18 per block) and the
# learn-sigma output rows; with learn_sigma=True and the prior counted they must match exactly.
OFFICIAL = {"S/2": 30_300_632, "B/2": 120_099_512, "L/2": 421_503_952, "XL/2": 618_948_120}


@pytest.mark.parametrize("size", list(OFFICIAL))
def test_parameter_counts_match_official(size):
    m = build_model(f"FlowDCN-{size}", device="meta", learn_sigma=True)
    n = sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())
    assert n == OFFICIAL[size]
    clean = build_model(f"FlowDCN-{size}", device="meta")
    assert abs(sum(p.numel() for p in clean.parameters()) - OFFICIAL[size]) / OFFICIAL[size] < 1e-3


def test_official_widths():
    assert model_config("FlowDCN-L/2").mlp_hidden == 2730
    assert model_config("FlowDCN-XL/2").hidden_size // model_config("FlowDCN-XL/2").groups == 72


@pytest.mark.parametrize("name", ["FlowDCN-debug", "SiT-debug"])
@pytest.mark.parametrize("hw", [(8, 8), (8, 16), (6, 10)])
def test_any_grid_shape(name, hw):
    m = build_model(name)
    x = torch.randn(2, 4, *hw)
    out = m(x, torch.rand(2), torch.tensor([0, 1000]))
    assert out.shape == x.shape


def test_bad_grid_and_unknown_names_are_errors():
    m = build_model("FlowDCN-debug")
    with pytest.raises(ValueError, match="divisible by the patch size"):
        m(torch.randn(1, 4, 7, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(KeyError, match="unknown model"):
        build_model("FlowDCN-XXL/2")
    with pytest.raises(TypeError, match="unknown override"):
        build_model("FlowDCN-debug", hidden=3)


def test_meta_build_then_init_weights_equals_eager_build():
    eager = build_model("FlowDCN-debug")
    torch.manual_seed(0)
    eager.init_weights()          # init_weights() alone defines every value (constructors' draws are overwritten)
    meta = build_model("FlowDCN-debug", device="meta")
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (n, a), (_, b) in zip(eager.state_dict().items(), meta.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    torch.testing.assert_close(meta.blocks[0].attn.deformables_prior, prior_grid(9))


def test_official_init_values():
    m = build_model("FlowDCN-debug", groups=4)
    attn = m.blocks[0].attn
    # Prior: the 3×3 grid, row-major in y; s0 gives initial scales σ(s0)·6 = 1.5, 3, 4.5, 6 (−6e-4).
    assert attn.deformables_prior[1].tolist() == [0.0, -1.0] and attn.deformables_prior[3].tolist() == [-1.0, 0.0]
    scales = torch.sigmoid(attn.deformables_scale) * 6
    torch.testing.assert_close(scales, torch.tensor([1.5, 3.0, 4.5, 6.0]) - 6e-4, atol=1e-5, rtol=0)
    for lin in (attn.qk_deformables, attn.qk_scales):
        assert lin.weight.abs().max() == 0
    assert attn.qk_weights.weight.abs().max() == 0 and attn.qk_weights.bias.abs().max() > 0
    assert m.blocks[0].adaLN_modulation[-1].weight.abs().max() > 0     # no adaLN-Zero in official FlowDCN
    # Zero final layer: the model outputs exactly zero at init.
    assert m(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).abs().max() == 0


def test_smax_argument_per_axis_and_per_block():
    torch.manual_seed(0)
    m = build_model("FlowDCN-debug")
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.1)     # make the output depend on the blocks
    x, t, y = torch.randn(1, 4, 8, 12), torch.rand(1), torch.tensor([3])
    base = m(x, t, y)
    torch.testing.assert_close(m(x, t, y, s_max=6.0), base)
    torch.testing.assert_close(m(x, t, y, s_max=torch.tensor([6.0, 6.0])), base)
    assert (m(x, t, y, s_max=torch.tensor([6.0, 3.0])) - base).abs().max() > 1e-6
    per_block = torch.tensor([[6.0, 6.0], [2.0, 9.0]])
    assert (m(x, t, y, s_max=per_block) - base).abs().max() > 1e-6
    with pytest.raises(ValueError, match="s_max"):
        resolve_smax(torch.ones(3, 2), 2, "cpu")


def test_official_smax_policy_values():
    p = OfficialSmaxPolicy(train_grid=(16, 16))
    s = p((16, 32), t=0.0, depth=12)                 # 2× wider than training, t=0: m=2
    assert s[0].tolist() == [6.0, 6.0] and s[4].tolist() == [6.0, 6.0] and s[8].tolist() == [6.0, 6.0]
    assert s[5].tolist() == [12.0, 6.0] and s[7].tolist() == [12.0, 6.0]
    s = p((48, 48), t=0.3, depth=12)                 # m = 1.5 caps r = 3
    assert s[6].tolist() == [9.0, 9.0]
    assert p((48, 48), t=0.7, depth=12).eq(6.0).all()
    c = ConstantRatioSmaxPolicy(train_grid=(16, 16))((8, 32), t=0.9, depth=3)
    assert c.tolist() == [[12.0, 6.0]] * 3


def test_with_smax_policy_feeds_the_model():
    seen = {}

    class Fake(torch.nn.Module):
        patch_size, blocks = 2, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]

        def forward(self, x, t, y, s_max=None):
            seen["s"] = s_max
            return x

    fn = with_smax_policy(Fake(), OfficialSmaxPolicy(train_grid=(4, 4), margin=4))
    fn(torch.zeros(2, 4, 8, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert seen["s"].shape == (11, 2) and seen["s"][5].tolist() == [12.0, 6.0]


def test_fused_projections_equal_the_separate_linears_in_fp64():
    """The one-GEMM packed projection (value | Δ | ŝ | weights) and w1/w3 GEMM compute exactly what the official
    separate Linears do."""
    torch.manual_seed(0)
    model = build_model("FlowDCN-debug", msdcn_impl="torch").double()
    blk = model.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    for p in attn.parameters():   # the official init zeroes Δ/ŝ weights: randomise so every column is tested
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 5, attn.dim, dtype=torch.float64)
    GC, GK = attn.groups * attn.channels, attn.groups * attn.kernel_points
    value, delta, scale_logit, weights = attn._proj(x).split([GC, 2 * GK, GK, GK], -1)   # the packed layout
    torch.testing.assert_close(value, attn.v(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(delta, attn.qk_deformables(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale_logit, attn.qk_scales(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, attn.qk_weights(x), rtol=1e-12, atol=1e-12)
    ref = mlp.w2(torch.nn.functional.silu(mlp.w1(x)) * mlp.w3(x))
    torch.testing.assert_close(mlp(x), ref, rtol=1e-12, atol=1e-12)
    # gradients reach the separate parameters, which stay the checkpoint's keys
    (delta.sum() + 2 * scale_logit.sum() + 3 * weights.sum() + 4 * value.sum() + mlp(x).square().sum()).backward()
    n = x[..., 0].numel()
    torch.testing.assert_close(attn.v.bias.grad, torch.full_like(attn.v.bias, 4.0 * n))
    torch.testing.assert_close(attn.qk_scales.weight.grad, 2 * x.reshape(n, -1).sum(0).expand_as(attn.qk_scales.weight))
    torch.testing.assert_close(attn.qk_weights.bias.grad, torch.full_like(attn.qk_weights.bias, 3.0 * n))
    assert attn.qk_scales.bias is None and mlp.w1.weight.grad is not None and mlp.w3.weight.grad is not None


def test_fused_projections_under_autocast_compile_and_what_they_keep_for_backward():
    """bf16 autocast: the fused GEMMs match the separate Linears (same bf16 rounding) in outputs and gradients;
    torch.compile(fullgraph) traces them; and forward keeps no concatenated weight copy for backward (it would
    outlive FSDP2's reshard / ZeRO-3's partitioning), and nothing but x and the parameters."""
    torch.manual_seed(0)
    blk = build_model("FlowDCN-debug", msdcn_impl="torch").blocks[0]
    attn, mlp = blk.attn, blk.mlp
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 5, attn.dim, requires_grad=True)

    def fused():
        return torch.cat([attn._proj(x), mlp(x)], -1)

    def separate():
        ref_mlp = mlp.w2(torch.nn.functional.silu(mlp.w1(x)) * mlp.w3(x))
        return torch.cat([attn.v(x), attn.qk_deformables(x), attn.qk_scales(x), attn.qk_weights(x), ref_mlp], -1)

    params = [x, *attn.parameters(), *mlp.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(), separate()
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)

    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(), fused(), rtol=1e-6, atol=1e-6)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn._proj(x)
        mlp.w2.weight.requires_grad_(False)   # count only what the fused w1/w3 GEMM keeps
        mlp(x)
        mlp.w2.weight.requires_grad_(True)
    own = {p.data_ptr() for p in params}   # saved parameters may arrive as aliases: compare storage
    big = [tuple(t.shape) for t in saved if t.data_ptr() not in own and t.dim() == 2 and attn.dim in t.shape]
    assert not big, f"a concatenated weight copy is kept for backward: {big}"


@pytest.mark.parametrize("name", ["FlowDCN-debug", "SiT-debug"])
def test_every_module_not_called_in_forward_is_declared_by_its_reader(name):
    """ZeRO-3 gathers parameters per called module: a module with parameters that forward never calls must be
    named in its parent's ``reads_child_params`` (and every name there must be such a module)."""
    model = build_model(name, **({"msdcn_impl": "torch"} if name.startswith("FlowDCN") else {}))
    called = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in model.modules()]
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1000]))
    for h in hooks:
        h.remove()
    for parent in model.modules():
        declared = set(getattr(parent, "reads_child_params", ()))
        for child_name, child in parent.named_children():
            uncalled = id(child) not in called and any(True for _ in child.parameters(recurse=False))
            assert uncalled == (child_name in declared), (type(parent).__name__, child_name, uncalled)
