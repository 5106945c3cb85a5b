"""EMA against closed forms, the per-sample-noise loss against modeling's FlowMatchingLoss, FLOPs against hand counts."""
from __future__ import annotations

import math

import pytest
import torch

from modeling import build_model
from modeling.objective import FlowMatchingConfig, FlowMatchingLoss
from trainer.ema import EMA
from trainer.flops import train_flops_per_image
from trainer.objective import draw_noise, flow_loss, seed64


def test_ema_constant_target_closed_form():
    """Parameters held at p after starting the EMA at e0: ema_n = d^n e0 + (1 − d^n) p (fp64 reference)."""
    e0 = torch.randn(5, 3, dtype=torch.float64)
    p = torch.randn(5, 3, dtype=torch.float64)
    d, n = 0.9, 37
    ema = EMA({"w": e0.float()}, decay=d)
    for _ in range(n):
        ema.update({"w": p.float()})
    torch.testing.assert_close(ema.shadow["w"].double(), d**n * e0 + (1 - d**n) * p, rtol=0, atol=1e-6)
    assert ema.num_updates == n


def test_ema_warmup_decay_closed_form():
    """With warm-up, update k uses min(d, (1+k)/(10+k)); the result is Σ_k p_k (1−d_k) Π_{j>k} d_j + e0 Π d_k."""
    torch.manual_seed(0)
    ps = torch.randn(20, 4, dtype=torch.float64)
    e0 = torch.randn(4, dtype=torch.float64)
    ema = EMA({"w": e0.float()}, decay=0.95, warmup_steps=12)
    ds = [min(0.95, (1 + k) / (10 + k)) if k < 12 else 0.95 for k in range(20)]
    for k in range(20):
        assert ema.current_decay() == pytest.approx(ds[k])
        ema.update({"w": ps[k].float()})
    ref = e0 * math.prod(ds)
    for k in range(20):
        ref = ref + ps[k] * (1 - ds[k]) * math.prod(ds[k + 1:])
    torch.testing.assert_close(ema.shadow["w"].double(), ref, rtol=0, atol=1e-6)


def test_ema_state_roundtrip():
    ema = EMA({"a": torch.zeros(3)}, decay=0.5)
    ema.update({"a": torch.ones(3)})
    other = EMA({"a": torch.zeros(3)}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["a"], torch.full((3,), 0.5)) and other.num_updates == 1
    with pytest.raises(KeyError, match="b"):
        EMA({"a": torch.zeros(3), "b": torch.zeros(1)}).load_state_dict(ema.state_dict())


@pytest.mark.parametrize("t_sampler", ["uniform", "logit_normal"])
def test_flow_loss_matches_modeling_objective(t_sampler):
    """Sample i of flow_loss equals FlowMatchingLoss on that sample alone with the generator of (seed, position i)."""
    torch.manual_seed(0)
    net = build_model("FlowDCN-debug", in_channels=1, num_classes=10, hidden_size=32, depth=2, groups=4).double()
    cfg = FlowMatchingConfig(t_sampler=t_sampler, label_dropout=0.5)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    positions = [100, 101, 102, 103, 104, 105]
    ours = flow_loss(net, x, y, draw_noise(cfg, 7, positions, (1, 8, 8)), null_class=10)
    ref = FlowMatchingLoss(cfg, null_class=10)
    for i, pos in enumerate(positions):
        g = torch.Generator().manual_seed(seed64(7, pos))
        torch.testing.assert_close(ours[i], ref(net, x[i:i + 1], y[i:i + 1], g)[0], rtol=1e-12, atol=0)


def test_noise_depends_only_on_seed_and_position():
    """Drawing positions 0..7 at once or as two rank slices / micro-batches gives the same rows."""
    cfg = FlowMatchingConfig()
    whole = draw_noise(cfg, 3, list(range(8)), (2, 4, 4))
    lo, hi = draw_noise(cfg, 3, list(range(4)), (2, 4, 4)), draw_noise(cfg, 3, list(range(4, 8)), (2, 4, 4))
    assert torch.equal(whole.eps, torch.cat([lo.eps, hi.eps])) and torch.equal(whole.t, torch.cat([lo.t, hi.t]))
    assert torch.equal(whole.drop, torch.cat([lo.drop, hi.drop]))
    assert not torch.equal(draw_noise(cfg, 4, list(range(8)), (2, 4, 4)).eps, whole.eps)
    assert whole.eps[0].std() > 0.3 and not torch.equal(whole.eps[0], whole.eps[1])


def test_sit_flops_match_hand_count():
    """SiT-debug at 32×32 (T tokens, width D): matmul FLOPs counted by hand, ×3 for forward + backward."""
    m = build_model("SiT-debug", device="meta")
    D, L, p, C, H = m.cfg.hidden_size, m.cfg.depth, m.patch_size, m.in_channels, 32
    T = (H // p) ** 2
    hidden = int(D * m.cfg.mlp_ratio)
    per_token_block = 2 * D * 3 * D + 2 * D * D + 2 * 2 * D * hidden + 2 * 2 * T * D   # qkv, proj, mlp, QKᵀ and AV
    per_image_block = 2 * D * 6 * D                                                     # adaLN modulation
    embed = T * 2 * C * p * p * D + 2 * 256 * D + 2 * D * D                             # patch conv, t-MLP
    final = 2 * D * 2 * D + T * 2 * D * p * p * m.out_channels                          # adaLN, linear
    fwd = embed + L * (T * per_token_block + per_image_block) + final
    assert train_flops_per_image("SiT-debug", {}, H, H) == 3 * fwd


def test_flowdcn_flops_match_hand_count():
    """FlowDCN-debug: the MSDCN projections, SwiGLU and adaLN matmuls (the bilinear gather is not counted)."""
    m = build_model("FlowDCN-debug", device="meta")
    c = m.cfg
    D, L, p, C, G, K = c.hidden_size, c.depth, c.patch_size, c.in_channels, c.groups, c.kernel_points
    T = (32 // p) ** 2
    msdcn = 2 * D * D + 2 * D * G * K * 2 + 2 * D * G * K + 2 * D * G * K + 2 * D * D   # v, Δ, ŝ, weights, out
    mlp = 3 * 2 * D * c.mlp_hidden
    fwd = (T * 2 * C * p * p * D + 2 * 256 * D + 2 * D * D + L * (T * (msdcn + mlp) + 2 * D * 6 * D)
           + 2 * D * 2 * D + T * 2 * D * p * p * m.out_channels)
    assert train_flops_per_image("FlowDCN-debug", {}, 32, 32) == 3 * fwd
