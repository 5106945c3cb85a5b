"""The strategy interface the loop talks to, and the DDP strategy (plain single process included).

A strategy builds and wraps the model and optimizer, runs backward/step, and saves/loads its own
sharded training state. The loop never branches on which strategy it holds.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn

from .. import dist
from ..checkpoint import load_state_file


class Strategy:
    """What the loop needs: model, autocast, no_sync, backward, clip, step, state I/O, EMA params."""

    model: nn.Module          # the wrapped module to call in forward
    module: nn.Module         # the unwrapped model (same parameters)
    optimizer: torch.optim.Optimizer

    def setup(self, build_model, make_optimizer) -> None:
        raise NotImplementedError

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that applies the update (DeepSpeed wraps it); its param_groups and state are the real ones."""
        return self.optimizer

    def autocast(self):
        return contextlib.nullcontext()

    def no_sync(self, skip_sync: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global grad norm over all ranks as a plain scalar tensor (clipped to ``max_norm`` when > 0)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:   # only measure: clip_grad_norm_(inf) would still multiply every gradient by 1.0
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # FSDP2: a replicated DTensor

    def step(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """The parameter update itself (FSDP applies it to the local shards)."""
        self.optimizer.step()

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def ema_params(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by their model names (local shards under sharded strategies)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def full_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Consolidate (possibly sharded) tensors to full CPU tensors on rank 0; None on other ranks."""
        return {k: v.detach().cpu() for k, v in tensors.items()} if dist.get_rank() == 0 else None

    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on rank 0 (for model.safetensors); None elsewhere."""
        return self.full_state_dict(self.module.state_dict())

    def load_full_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) weights into the model, e.g. the previous stage's (strict)."""
        self.module.load_state_dict(state)

    def shard_like_params(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors -> the local layout of ``ema_params()`` (identity when unsharded)."""
        own = self.ema_params()
        missing = sorted(set(own) - set(full))
        if missing:
            raise KeyError(f"weights lack parameters {missing[:5]}")
        return {k: full[k] for k in own}

    def save(self, path: str, ema_state: dict) -> None:
        raise NotImplementedError

    def load(self, path: str, ema_state: dict) -> dict:
        """Restore model + optimizer from checkpoint ``path``; returns the EMA state (laid out like ``ema_state``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what setup() built (so a second run in the same process starts clean)."""


class DDPStrategy(Strategy):
    """DistributedDataParallel over gloo/nccl, or the bare model in a single process."""

    def __init__(self, cfg, precision: str, activation_checkpointing: bool = False, compile: bool = False,
                 compile_mode: str = "default"):
        self.cfg, self.precision = cfg, precision
        self.ac, self.compile, self.compile_mode = activation_checkpointing, compile, compile_mode

    def setup(self, build_model, make_optimizer) -> None:
        dev = dist.device()
        # Initialise on CPU from the seeded CPU generator (the same values as every other strategy), then move.
        self.module = build_model("cpu").to(dev)
        if self.ac or self.compile:
            from .fsdp import apply_ac, apply_compile

            if self.ac:
                apply_ac(self.module)
            if self.compile:
                apply_compile(self.module, self.compile_mode)
        self.model = self.module
        if dist.get_world_size() > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.optimizer = make_optimizer(self.module.parameters())

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(dist.device().type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, skip_sync: bool):
        if skip_sync and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def save(self, path: str, ema_state: dict) -> None:
        # Replicated state: rank 0 writes one file.
        if dist.get_rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), "ema": ema_state},
                       os.path.join(path, "train_state.pt"))

    def load(self, path: str, ema_state: dict) -> dict:
        state = load_state_file(os.path.join(path, "train_state.pt"),
                                missing_hint=" (written by another strategy? ddp reads train_state.pt)")
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["ema"]
