"""FSDP2 strategy: ``fully_shard`` per unit of ``blocks_per_unit`` blocks, then the final layer and the root; DCP
checkpoints.

Order of model transforms (torchtitan's): activation checkpointing → torch.compile per block →
FSDP. All three keep parameter names unchanged (composable ``checkpoint``, in-place
``Module.compile``), so checkpoints, EMA keys and safetensors exports are the same for every
strategy. The model is built on ``meta``, sharded, then materialised (``to_empty``) and filled with
the values of an unsharded initialisation from the same seed.

Training state (model, optimizer, EMA shadow) is saved with torch.distributed.checkpoint (DCP):
every rank writes its shards, and loading reshards, so a run saved by N processes resumes on M.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.optim.adam import adam as functional_adam   # what Adam/AdamW.step call, on any tensors

from .. import dist
from . import COMPILE_MODES
from .base import Strategy


def _plain_shard(t: torch.Tensor) -> bool:
    """A Shard(0) DTensor of a 1-D mesh: FSDP2's layout, where the local tensors hold each element once."""
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and t.placements == (Shard(0),)


def apply_ac(model: nn.Module) -> None:
    """Recompute each block's activations in backward (composable API: parameter names unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def apply_compile(model: nn.Module, mode: str = "default") -> None:
    """torch.compile each block in place (one graph reused by all blocks of the same shape)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
    for block in model.blocks:
        block.compile(mode=mode)


def apply_fsdp(model: nn.Module, mesh, mp_policy: MixedPrecisionPolicy | None, reshard_after_forward: bool,
               blocks_per_unit: int) -> None:
    """fully_shard blocks in groups of ``blocks_per_unit``, then the final layer, then the root. With
    ``reshard_after_forward`` (not the default) the other units reshard after forward, but the final layer and the
    last unit of blocks never do: backward needs them first, so resharding them would only buy an immediate second
    all-gather (torchtitan does the same for its last block).

    FSDP2's hooks cost host time per unit (all-gather copy-in/out, reduce-scatter, DTensor bookkeeping); XL
    blocks are small (~2.5 ms of GPU work per fwd+bwd at batch 32), so grouping trades a little memory
    (``blocks_per_unit`` blocks unsharded at a time when resharding) for fewer, larger collectives and less host
    overhead.
    """
    if blocks_per_unit < 1:
        raise ValueError(f"strategy.blocks_per_unit must be >= 1, got {blocks_per_unit}")
    kw = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    blocks = list(model.blocks)
    for i in range(0, len(blocks), blocks_per_unit):
        unit = blocks[i:i + blocks_per_unit]
        last = i + blocks_per_unit >= len(blocks)
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=reshard_after_forward and not last, **kw)
    # FSDP2 attaches its pre-backward hook to a unit's outputs and warns when one is a view (an in-place op on it
    # would drop the hook); the final layer's Linear returns a view of its 2-D matmul on [N, h, w, D] tokens. A copy
    # of this small tensor (p²·C_out channels) keeps the hook safe and the logs free of that warning. Registered
    # before fully_shard, so it runs before FSDP's post-forward hook sees the output.
    model.final_layer.register_forward_hook(lambda module, args, out: out.clone() if out._is_view() else out)
    fully_shard(model.final_layer, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


@torch.no_grad()
def init_from_full(model: nn.Module, full: nn.Module | None) -> None:
    """Fill a materialised sharded model with the values of an unsharded one built on rank 0 only.

    The models' ``init_weights()`` cannot run on DTensor shards (it copies plain tensors into
    parameters), and on CPU DTensor random init is not shard-consistent; copying from a full
    initialisation gives exactly the unsharded values on any device and world size. Only rank 0 holds
    the full model (``full`` is None elsewhere): each rank receives just its shards, so a node with 8
    ranks builds one CPU copy of XL instead of 8 (torchtitan's broadcast-from-rank-0 seed checkpoint).
    """
    rank0 = dist.get_rank() == 0
    if rank0 == (full is None):
        raise ValueError("init_from_full: the full model must be given on rank 0 and only there")
    many = dist.get_world_size() > 1
    set_model_state_dict(model, full.state_dict() if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, strict=True, broadcast_from_rank0=many))
    full_buffers = dict(full.named_buffers()) if rank0 else {}
    for name, buf in model.named_buffers():   # non-persistent buffers (e.g. the MSDCN prior grid): replicated
        if rank0:
            buf.copy_(full_buffers[name].to(buf.device, buf.dtype))
        if many:
            torch.distributed.broadcast(buf, src=0)


class FSDPStrategy(Strategy):
    """FSDP2 over all ranks (a one-process group when run alone); bf16 params/compute, fp32 reduce when precision=bf16."""

    def __init__(self, cfg, precision: str, activation_checkpointing: bool = False, compile: bool = False,
                 compile_mode: str = "default"):
        self.cfg, self.precision = cfg, precision
        self.ac, self.compile, self.compile_mode = activation_checkpointing, compile, compile_mode
        self._plain_shards: bool | None = None   # gradients are Shard(0) DTensors of a 1-D mesh (clip_grad_norm)
        self._local_adam: bool | None = None     # optimizer steps on the local shards (see optimizer_step)

    def setup(self, build_model, make_optimizer) -> None:
        dist.init(self.cfg.backend, require=True)   # FSDP2 needs a process group even for one process
        dev = dist.device()
        # The unsharded init, from the seeded CPU generator, on rank 0 only (the others get their shards from it).
        full = build_model("cpu") if dist.get_rank() == 0 else None
        model = build_model("meta")
        if self.ac:
            apply_ac(model)
        if self.compile:
            apply_compile(model, self.compile_mode)
        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.precision == "bf16" else None
        apply_fsdp(model, mesh, mp, self.cfg.reshard_after_forward, self.cfg.blocks_per_unit)
        model.to_empty(device=dev)
        init_from_full(model, full)
        del full
        self.module = self.model = model
        self.optimizer = make_optimizer(model.parameters())

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global grad norm from the local shards: every FSDP2 gradient is a Shard(0) DTensor of the 1-D mesh, so
        summing ‖local shard‖² over ranks counts each element once. One foreach norm and one all-reduce, where
        torch's clip_grad_norm_ on DTensors pays DTensor dispatch for foreach_norm, stack and norm (host time that
        an FSDP2 step, host-bound at XL, cannot spare). Clips in place (the shards share the DTensors' storage)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=dist.device())
        if self._plain_shards is None:   # the layout is fixed for the run: checked once, not on every step
            self._plain_shards = all(map(_plain_shard, grads))
        if not self._plain_shards:
            return super().clip_grad_norm(max_norm)   # not plain 1-D FSDP2 shards: torch's DTensor-aware path
        local = [g.to_local() for g in grads]   # under no_grad: the local tensor itself, no autograd node
        sq = torch.stack(torch._foreach_norm(local, 2.0)).float().square().sum()
        norm = dist.all_reduce_sum(sq).sqrt()
        if max_norm > 0:   # torch's rule: scale by max_norm / (norm + 1e-6) when that is below 1
            torch._foreach_mul_(local, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def optimizer_step(self) -> None:
        if not self._local_adam_step():
            self.optimizer.step()

    @torch.no_grad()
    def _local_adam_step(self) -> bool:
        """torch's Adam/AdamW update applied to the local shards; False (nothing done) where it does not apply.

        Adam is elementwise, and a parameter, its gradient and both moments are Shard(0) DTensors of one layout, so
        the update of the local tensors is the update of the DTensors. Through the DTensors, torch's step pays
        DTensor dispatch (sharding propagation, unwrapping ~4 x 490 tensors at XL) in every foreach/fused call:
        host time of the host-bound FSDP2 step. Here the same functional ``adam`` (same kernels, same arguments)
        runs on the local tensors. It applies from the second step (the first, through torch, creates the state);
        anything unusual (other optimizers, amsgrad, tensor lr, capturable, other layouts) takes torch's path.
        """
        opt = self.optimizer
        if self._local_adam is False or type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
            return False
        if self._local_adam is None:   # the settings are fixed for the run: checked once
            self._local_adam = all(not g["amsgrad"] and not g["maximize"] and not g["capturable"]
                                   and not g["differentiable"] and not torch.is_tensor(g["lr"])
                                   for g in opt.param_groups)
            if not self._local_adam:
                return False
        work = []
        for g in opt.param_groups:   # gather and check everything before changing anything
            p_, g_, m_, v_, s_ = [], [], [], [], []
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = opt.state.get(p)
                if not st or "exp_avg" not in st:
                    return False   # first step: torch creates the state
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if not all(map(_plain_shard, (p, p.grad, m, v))) or isinstance(st["step"], DTensor):
                    self._local_adam = False
                    return False
                p_.append(p.to_local())   # under no_grad: the local tensor itself
                g_.append(p.grad.to_local())
                m_.append(m.to_local())
                v_.append(v.to_local())
                s_.append(st["step"])
            work.append((g, p_, g_, m_, v_, s_))
        for i, (g, p_, g_, m_, v_, s_) in enumerate(work):
            beta1, beta2 = g["betas"]
            decoupled = g.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW)   # AdamW: decoupled decay
            try:
                functional_adam(p_, g_, m_, v_, [], s_, foreach=g["foreach"], fused=g["fused"], capturable=False,
                                differentiable=False, grad_scale=None, found_inf=None, has_complex=False,
                                decoupled_weight_decay=decoupled,
                                amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"],
                                weight_decay=g["weight_decay"], eps=g["eps"], maximize=False)
            except TypeError as e:   # another torch's functional signature: binding fails before any update
                if i:
                    raise
                warnings.warn(f"fsdp: optimizer step on local shards unavailable ({e}); using torch's DTensor step",
                              RuntimeWarning, stacklevel=2)
                self._local_adam = False
                return False
        return True

    def full_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        out = {}
        for k, v in tensors.items():   # one all-gather per tensor: no full replica of everything at once on GPU
            full = v.full_tensor() if isinstance(v, DTensor) else v
            if dist.get_rank() == 0:
                out[k] = full.detach().cpu()
        return out if dist.get_rank() == 0 else None

    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else None

    def load_full_weights(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True, strict=True))

    def shard_like_params(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        own = self.ema_params()
        missing = sorted(set(own) - set(full))
        if missing:
            raise KeyError(f"weights lack parameters {missing[:5]}")
        return {k: distribute_tensor(full[k].to(p.device, torch.float32), p.device_mesh, p.placements)
                if isinstance(p, DTensor) else full[k] for k, p in own.items()}

    def _state(self, ema_state: dict) -> dict:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "ema": dict(ema_state["shadow"]),
                "ema_num_updates": torch.tensor(int(ema_state["num_updates"]))}

    def save(self, path: str, ema_state: dict) -> None:
        dcp.save(self._state(ema_state), checkpoint_id=os.path.join(path, "dcp"))

    def load(self, path: str, ema_state: dict) -> dict:
        ckpt = os.path.join(path, "dcp")
        if not os.path.isdir(ckpt):
            raise FileNotFoundError(f"checkpoint file missing: {ckpt} (written by another strategy? fsdp reads DCP)")
        sd = self._state(ema_state)
        try:
            dcp.load(sd, checkpoint_id=ckpt)
        except Exception as e:   # DCP wraps per-rank errors; name the directory
            raise ValueError(f"corrupt or unreadable DCP checkpoint {ckpt}: {e}") from None
        set_state_dict(self.module, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return {"shadow": sd["ema"], "num_updates": int(sd["ema_num_updates"])}

    def close(self) -> None:
        self.module = self.model = self.optimizer = None
