"""Load official FlowDCN release checkpoints into our FlowDCN (../shared/reference/flowdcn.md §9).

Accepted layouts, detected in this order:
  1. a Lightning checkpoint with ``optimizer_states[0]["ema"]``: the EMA weights as a positional tuple
     in the order of the official ``FlowDCN.parameters()`` (used when ``which="ema"``);
  2. a Lightning checkpoint with ``state_dict`` (raw weights, keys prefixed ``denoiser.``);
  3. a plain state dict (official key names, with or without the prefix).
Every name and shape is validated; anything unexpected is an error naming the key.
Released checkpoints were trained with the official truncating kernel: build the model with
``rounding="trunc"`` (``build_from_official`` does) to reproduce them.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict

import torch

from .msdcn import prior_grid

_TOP = [
    "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
]
_BLOCK = [
    "norm1.weight", "attn.deformables_prior", "attn.deformables_scale",
    "attn.v.weight", "attn.v.bias", "attn.qk_deformables.weight", "attn.qk_deformables.bias",
    "attn.qk_scales.weight", "attn.qk_weights.weight", "attn.qk_weights.bias",
    "attn.out.weight", "attn.out.bias", "norm2.weight",
    "mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
]


class CheckpointFormatError(ValueError):
    """The file is not an official FlowDCN checkpoint matching the model."""


def official_param_names(depth: int) -> list[str]:
    """Official ``FlowDCN.parameters()`` order = the EMA tuple order: 11 top-level, then 18 per block."""
    return list(_TOP) + [f"blocks.{i}.{n}" for i in range(depth) for n in _BLOCK]


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"official checkpoint not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as e:
        raise CheckpointFormatError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({e}). It holds Python objects beyond "
            "tensors; we load weights only through weights_only=True or safetensors. Extract its "
            "state_dict / EMA tuple once in a trusted environment and save it with torch.save or safetensors."
        ) from None


def official_state_dict(path: str, depth: int, which: str = "ema") -> "OrderedDict[str, torch.Tensor]":
    """Read an official file and return the official-named state dict (EMA or raw weights)."""
    ckpt = _load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, got {type(ckpt).__name__}")
    names = official_param_names(depth)
    if which == "ema" and "optimizer_states" in ckpt:
        ema = ckpt["optimizer_states"][0].get("ema") if ckpt["optimizer_states"] else None
        if ema is None:
            raise CheckpointFormatError(f"{path}: optimizer_states[0] has no 'ema' entry")
        if len(ema) != len(names):
            raise CheckpointFormatError(
                f"{path}: EMA tuple has {len(ema)} tensors, a depth-{depth} FlowDCN has {len(names)} (11 + 18·depth)")
        return OrderedDict(zip(names, ema))
    if which == "ema" and "state_dict" in ckpt:
        raise CheckpointFormatError(f"{path}: has raw weights but no EMA (optimizer_states); pass which='raw' to load them")
    sd = ckpt.get("state_dict", ckpt)
    out = OrderedDict()
    for k, v in sd.items():
        if k.startswith(("vae.", "metric.")):
            continue  # not part of the denoiser (stripped by the official hook anyway)
        out[k[len("denoiser."):] if k.startswith("denoiser.") else k] = v
    missing, extra = sorted(set(names) - set(out)), sorted(set(out) - set(names))
    if missing or extra:
        raise CheckpointFormatError(f"{path}: key mismatch; missing {missing[:8]}{'…' if len(missing) > 8 else ''}, "
                                    f"unexpected {extra[:8]}{'…' if len(extra) > 8 else ''}")
    return out


def convert_official(sd: dict, model) -> "OrderedDict[str, torch.Tensor]":
    """Official names/shapes -> our state dict for ``model`` (validating every tensor)."""
    cfg = model.cfg
    G, K, p = cfg.groups, cfg.kernel_points, cfg.patch_size
    ours = model.state_dict()
    grid = prior_grid(K)
    out = OrderedDict()
    for k, v in sd.items():
        if k.endswith("attn.deformables_prior"):
            if v.numel() != K * 2 or not torch.allclose(v.float().reshape(K, 2), grid):
                raise CheckpointFormatError(f"{k}: prior grid differs from the official 3×3 grid {grid.tolist()}")
            continue  # a fixed buffer here
        if k.endswith("attn.deformables_scale"):
            if v.numel() != G:
                raise CheckpointFormatError(f"{k}: expected {G} per-group scales, got shape {tuple(v.shape)}")
            v = v.reshape(G)
        if k.startswith("final_layer.linear.") and v.shape[0] == p * p * 2 * cfg.in_channels and not cfg.learn_sigma:
            # Official learn_sigma layout: rows ordered (pi, pj, ch) over 2·C channels; keep ch < C.
            C = cfg.in_channels
            keep = torch.tensor([(i * 2 * C) + ch for i in range(p * p) for ch in range(C)])
            drop = torch.tensor([(i * 2 * C) + ch for i in range(p * p) for ch in range(C, 2 * C)])
            if v[drop].abs().max() > 0:
                raise CheckpointFormatError(f"{k}: learned-sigma rows are not zero; build the model with learn_sigma=True")
            v = v[keep]
        if k not in ours:
            raise CheckpointFormatError(f"{k}: no such parameter in {type(model).__name__}")
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointFormatError(f"{k}: shape {tuple(v.shape)} does not match the model's {tuple(ours[k].shape)}")
        out[k] = v.to(ours[k].dtype)
    missing = sorted(set(ours) - set(out))
    if missing:
        raise CheckpointFormatError(f"official checkpoint lacks {missing[:8]}")
    return out


def load_official_checkpoint(path: str, model, which: str = "ema") -> None:
    """Load an official file into ``model`` in place (EMA weights by default)."""
    model.load_state_dict(convert_official(official_state_dict(path, len(model.blocks), which), model))


def build_from_official(path: str, name: str, which: str = "ema", **overrides):
    """Build ``name`` with the compat settings of released checkpoints (trunc rounding) and load ``path``."""
    from .registry import build_model

    model = build_model(name, **{"rounding": "trunc", **overrides})
    load_official_checkpoint(path, model, which)
    return model
