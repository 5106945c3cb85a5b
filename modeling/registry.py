"""Size presets and ``build_model(name, **overrides)``; ``debug`` sizes are for tests and the CPU demo."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .flowdcn import FlowDCN, FlowDCNConfig
from .sit import SiT, SiTConfig

# (hidden, depth, groups/heads): official FlowDCN configs, with SiT heads = FlowDCN groups.
_SIZES = {
    "debug": (64, 2, 4),
    "S/2": (384, 12, 6),
    "B/2": (768, 12, 12),
    "L/2": (1024, 24, 16),
    "XL/2": (1152, 28, 16),
}

FLOWDCN_CONFIGS = {k: dict(hidden_size=h, depth=d, groups=g) for k, (h, d, g) in _SIZES.items()}
SIT_CONFIGS = {k: dict(hidden_size=h, depth=d, num_heads=g) for k, (h, d, g) in _SIZES.items()}

MODELS = {f"FlowDCN-{k}": (FlowDCN, FlowDCNConfig, v) for k, v in FLOWDCN_CONFIGS.items()}
MODELS.update({f"SiT-{k}": (SiT, SiTConfig, v) for k, v in SIT_CONFIGS.items()})


def model_config(name: str, **overrides):
    """The typed config of a registered model with overrides applied; unknown names/fields are errors."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    _, cfg_cls, preset = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"{name}: unknown override(s) {bad}; valid fields: {sorted(fields)}")
    return cfg_cls(**{**preset, **overrides})


def build_model(name: str, device: torch.device | str | None = None, **overrides) -> nn.Module:
    """Build a registered model; on ``device="meta"`` nothing is initialised until ``init_weights()``."""
    model_cls = MODELS[name][0] if name in MODELS else None
    cfg = model_config(name, **overrides)
    with torch.device(device) if device is not None else _nullcontext():
        model = model_cls(cfg)
    model.name = name
    model.overrides = dict(overrides)
    return model


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
