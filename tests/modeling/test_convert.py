"""Official FlowDCN checkpoint layouts (Lightning state_dict, positional EMA tuple, plain) -> our model."""
import pytest
import torch

from modeling import build_model
from modeling.convert import (CheckpointFormatError, build_from_official, load_official_checkpoint, official_param_names,
                              official_state_dict)
from modeling.msdcn import prior_grid


def official_layout(depth=2, hidden=64, groups=4, K=9, seed=0):
    """A random state dict with the official names and shapes (learn_sigma 8 channels, prior (1,1,1,1,K,2))."""
    g = torch.Generator().manual_seed(seed)
    ref = build_model("FlowDCN-debug", learn_sigma=True)
    sd = {}
    for name in official_param_names(depth):
        if name.endswith("deformables_prior"):
            sd[name] = prior_grid(K).view(1, 1, 1, 1, K, 2).clone()
        elif name.endswith("deformables_scale"):
            sd[name] = torch.randn(1, 1, 1, groups, 1, 1, generator=g)
        else:
            sd[name] = torch.randn(ref.state_dict()[name].shape, generator=g)
    # The learned-sigma rows (ch >= 4 of each patch position) never train: zero, as in released files.
    w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    for i in range(4):
        w[i * 8 + 4: i * 8 + 8] = 0
        b[i * 8 + 4: i * 8 + 8] = 0
    return sd


def expected_ours(sd):
    """The same tensors mapped by hand: scale (G,), sigma rows dropped, prior removed."""
    out = {}
    for k, v in sd.items():
        if k.endswith("deformables_prior"):
            continue
        if k.endswith("deformables_scale"):
            v = v.reshape(-1)
        if k.startswith("final_layer.linear."):
            v = torch.cat([v[i * 8: i * 8 + 4] for i in range(4)])
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["lightning_state_dict", "ema_tuple", "plain"])
def test_load_each_layout(tmp_path, layout):
    raw, ema = official_layout(seed=1), official_layout(seed=2)
    if layout == "lightning_state_dict":
        ckpt, which, want = {"state_dict": {f"denoiser.{k}": v for k, v in raw.items()}, "epoch": 3}, "raw", raw
    elif layout == "ema_tuple":
        ckpt = {"state_dict": {f"denoiser.{k}": v for k, v in raw.items()},
                "optimizer_states": [{"ema": tuple(ema[n] for n in official_param_names(2)), "current_step": 5, "decay": 0.9999}]}
        which, want = "ema", ema
    else:
        ckpt, which, want = raw, "raw", raw
    path = tmp_path / "official.pth"
    torch.save(ckpt, path)
    model = build_model("FlowDCN-debug")
    load_official_checkpoint(str(path), model, which)
    ours = model.state_dict()
    for k, v in expected_ours(want).items():
        torch.testing.assert_close(ours[k], v, msg=k)


def test_build_from_official_uses_trunc_and_runs(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(official_layout(), path)
    model = build_from_official(str(path), "FlowDCN-debug", which="raw")
    assert all(b.attn.rounding == "trunc" for b in model.blocks)
    out = model(torch.randn(1, 4, 8, 16), torch.rand(1), torch.tensor([3]))
    assert out.shape == (1, 4, 8, 16) and torch.isfinite(out).all()


def test_errors_name_the_problem(tmp_path):
    sd = official_layout()
    bad = dict(sd)
    bad["blocks.0.attn.v.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointFormatError, match=r"blocks\.0\.attn\.v\.weight: shape"):
        load_official_checkpoint(str(tmp_path / "shape.pth"), build_model("FlowDCN-debug"), "raw")
    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.w2.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointFormatError, match="missing.*blocks.1.mlp.w2.weight"):
        official_state_dict(str(tmp_path / "missing.pth"), 2, "raw")
    torch.save({"optimizer_states": [{"ema": (torch.zeros(1),) * 5}]}, tmp_path / "short.pth")
    with pytest.raises(CheckpointFormatError, match="EMA tuple has 5 tensors"):
        official_state_dict(str(tmp_path / "short.pth"), 2, "ema")
    prior = dict(sd)
    prior["blocks.0.attn.deformables_prior"] = torch.zeros(1, 1, 1, 1, 9, 2)
    torch.save(prior, tmp_path / "prior.pth")
    with pytest.raises(CheckpointFormatError, match="prior grid"):
        load_official_checkpoint(str(tmp_path / "prior.pth"), build_model("FlowDCN-debug"), "raw")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        official_state_dict(str(tmp_path / "nope.pth"), 2)


class Hyper:   # a Lightning-style non-tensor object stored in a checkpoint
    pass


def test_non_tensor_pickles_are_refused(tmp_path):
    torch.save({"state_dict": {}, "hyper": Hyper()}, tmp_path / "obj.pth")
    with pytest.raises(CheckpointFormatError, match="weights_only"):
        official_state_dict(str(tmp_path / "obj.pth"), 2, "raw")
