"""DeepSpeed ZeRO-1/2/3 behind the Strategy interface; the DeepSpeed config is generated from ours.

DeepSpeed's engine owns backward, the optimizer step and its checkpoints, so this strategy issues
those calls and the loop stays the same. The optimizer is a client ``torch.optim.AdamW`` (no JIT
build) unless ``strategy.deepspeed_optimizer`` asks for DeepSpeed's own (fused Adam), or
``strategy.offload_optimizer`` needs its CPU Adam (both JIT-compile C++ on first use, ~40 s).

EMA: each rank keeps the EMA of the fp32 master elements its optimizer owns (ZeRO-3 partitions,
ZeRO-1/2 fragments of the flat partition), so there is no full replica and no bf16 rounding; it
is gathered only to export ``ema.safetensors``.

Resume on another number of processes goes through DeepSpeed's universal checkpoint format: rank 0
converts the checkpoint once (``ds_to_universal``) into ``deepspeed_universal/`` inside it, and every
rank loads its new partition from there; the sharded EMA is re-sharded from ``ema.safetensors``.
Limits (errors, not silent): a change of ZeRO stage on resume is refused; ``train.on_nonfinite=skip``
is refused (a DeepSpeed step cannot be dropped once gradients are reduced); ``train.compile`` and
``activation_checkpointing`` are refused (use fsdp or ddp for those).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import json
import os
import shutil
import sys

import torch
import torch.distributed as tdist

from .. import dist
from ..checkpoint import load_state_file, load_weights
from .base import Strategy


def build_ds_config(stage: int, sched, optim, strategy_cfg, world: int) -> dict:
    """Our typed config -> a DeepSpeed config dict (batch sizes, ZeRO stage, bf16, buckets, offload, clipping)."""
    per_rank = sched.global_batch // world
    micro = sched.micro_batch or per_rank
    if per_rank * world != sched.global_batch or per_rank % micro:
        raise ValueError(f"global_batch {sched.global_batch} must split into world {world} × micro_batch {micro} × accumulation")
    zero = {"stage": stage, "reduce_bucket_size": int(strategy_cfg.reduce_bucket_size),
            "allgather_bucket_size": int(strategy_cfg.reduce_bucket_size), "overlap_comm": False}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(strategy_cfg.reduce_bucket_size), stage3_param_persistence_threshold=0)
    if strategy_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_batch_size": sched.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "zero_optimization": zero,
        "bf16": {"enabled": sched.precision == "bf16"},
        "gradient_clipping": float(optim.grad_clip),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if strategy_cfg.deepspeed_optimizer or strategy_cfg.offload_optimizer:
        # ZeRO-Offload steps on the CPU with DeepSpeedCPUAdam (DeepSpeed refuses a client optimizer there).
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                         "weight_decay": optim.weight_decay}}
    return cfg


def _register_direct_reads(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's own parameters when that module is called. Modules whose forward reads
    their children's weights without calling the children (fused GEMMs; ``reads_child_params`` in modeling)
    get those weights registered as external parameters, so they are gathered (and prefetched) with the
    reading module. Without this DeepSpeed still finds them, lazily: a blocking gather on first access
    inside forward, through its parameter-dict getter. The results are the same either way (checked on CPU)."""
    import deepspeed

    for m in module.modules():
        for child in getattr(m, "reads_child_params", ()):
            for p in getattr(m, child).parameters():
                deepspeed.zero.register_external_parameter(m, p)


def autocast_inside(module: torch.nn.Module, device_type: str) -> None:
    """Run ``module``'s own forward under bf16 autocast, whatever the caller's autocast state.

    DeepSpeed's ``engine.forward`` turns an outer CUDA autocast *off* around the module (its ``torch_autocast``
    section, a different precision scheme with fp32 parameters, is off in our bf16 mode), while its bf16 mode makes
    the parameters bf16 and leaves the inputs fp32: without this, the first layer fails on a GPU with "Input type
    (float) and bias type (c10::BFloat16) should be the same". (On CPU the engine only checks CUDA autocast, so the
    CPU tests never saw it.) The instance's ``forward`` is wrapped rather than the module (the parameter names, which
    the checkpoints use, stay), and a ``with`` block keeps it exact on exceptions, nested calls and threads.
    """
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    module.forward = forward


def steps_on_param_devices(optimizer: torch.optim.Optimizer) -> None:
    """Put each ``step`` of a fused or capturable torch optimizer back on its parameter's device, in fp32.

    DeepSpeed's universal-checkpoint loader (resume on another world size) restores ``step`` as a CPU tensor, and
    torch's fused CUDA AdamW (the trainer's default on GPUs) then fails at the first step with "state_steps is on
    cpu".
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st and torch.is_tensor(st.get("step")) and (st["step"].device != p.device or st["step"].dtype != torch.float32):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


class DeepSpeedStrategy(Strategy):
    """ZeRO stage 1, 2 or 3 via deepspeed.initialize."""

    def __init__(self, cfg, sched, optim):
        self.cfg, self.sched, self.optim_cfg = cfg, sched, optim
        self.stage = int(cfg.name[-1])
        self.precision = sched.precision
        if sched.on_nonfinite != "stop":
            raise ValueError(f"strategy {cfg.name}: train.on_nonfinite={sched.on_nonfinite!r} is not supported "
                             "(a DeepSpeed step cannot be dropped); use 'stop', or strategy=fsdp/ddp")
        if sched.compile or sched.activation_checkpointing:
            raise ValueError(f"strategy {cfg.name}: train.compile / train.activation_checkpointing are not wired for "
                             "DeepSpeed; use strategy=fsdp or ddp")

    def setup(self, build_model, make_optimizer) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed

        if not torch.cuda.is_available():
            # CPU: skip the shared-memory comm op's JIT build (~40 s, leaves /dev/shm files); plain gloo collectives.
            import deepspeed.comm.torch  # noqa: F401

            sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        dist.init(self.cfg.backend, require=True)
        os.environ.setdefault("LOCAL_RANK", "0")   # a plain `python` process: DeepSpeed insists on the variable
        deepspeed.init_distributed(dist_backend=tdist.get_backend(), auto_mpi_discovery=False)
        self.world = dist.get_world_size()
        module = build_model("cpu").to(dist.device())   # the same seeded CPU init as every strategy
        if self.stage == 3:
            _register_direct_reads(module)
        ds_cfg = build_ds_config(self.stage, self.sched, self.optim_cfg, self.cfg, self.world)
        self.gas = ds_cfg["gradient_accumulation_steps"]
        client_opt = None if "optimizer" in ds_cfg else make_optimizer(module.parameters())
        engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client_opt, config=ds_cfg,
                                                       model_parameters=module.parameters())
        self.engine, self.model, self.module, self.optimizer = engine, engine, engine.module, optimizer
        if self.precision == "bf16":
            autocast_inside(self.module, dist.device().type)
        self._micro = 0
        # ZeRO-1/2 parameters map to fragments of this rank's optimizer partition (used for a cheap grad norm).
        self._fragments = self.stage < 3 and all(hasattr(p, "_hp_mapping") for p in self.module.parameters()
                                                 if p.requires_grad)
        self._empty = torch.zeros(0, dtype=torch.float32, device=dist.device())

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer   # inside DeepSpeed's ZeRO wrapper: ours, or its CPU Adam under offload

    # ---- loop interface
    def autocast(self):
        # bf16 engine parameters with fp32 inputs: autocast casts matmul inputs (DeepSpeed does not cast them). On GPUs
        # the engine turns this off around the module, where autocast_inside re-enters it; this one still covers the
        # loss computed from the model's output.
        if self.precision == "bf16":
            return torch.autocast(dist.device().type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already scales the loss by the per-rank batch; DeepSpeed must not divide again by GAS.
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.gas:
            self.engine.step()   # not a boundary: DeepSpeed only counts the micro-step

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global grad norm before the step (DeepSpeed clips inside step() with ``gradient_clipping``)."""
        if self._micro != self.gas:
            raise RuntimeError(f"DeepSpeed: {self._micro} micro-batches this step, config says {self.gas} "
                               "(variable per-step batch sizes are not supported with zero*)")
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        sq = torch.zeros((), dtype=torch.float64, device=dist.device())
        for p in self.module.parameters():
            if not p.requires_grad:
                continue
            sq += self._local_grad_sq(p, safe_get_local_grad, safe_get_full_grad)
        if self.stage == 3 or self._fragments:
            dist.all_reduce_sum(sq)   # every rank summed the squares of the gradient elements it owns
        return sq.sqrt().float()

    def _local_grad_sq(self, p, safe_get_local_grad, safe_get_full_grad) -> torch.Tensor:
        """Σ g² over the gradient elements of ``p`` that this rank owns (ZeRO-1/2 fallback: the full gradient)."""
        if self.stage == 3:   # this rank's fp32 partition (zero padding)
            g = safe_get_local_grad(p)
        elif self._fragments:
            # ZeRO-1/2: the fragment of p in this rank's optimizer partition, as deepspeed.utils.safe_get_full_grad
            # locates it, without assembling the full gradient (one all-reduce per tensor).
            if p._hp_mapping is None:
                return torch.zeros((), dtype=torch.float64, device=dist.device())
            g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).flatten()
            addr = p._hp_mapping.lp_fragment_address
            if g.numel() == p.numel():   # bf16 keeps a full accumulation buffer: take only the owned fragment
                g = g.narrow(0, addr.start, addr.numel)
        else:
            g = safe_get_full_grad(p)
        return g.double().pow(2).sum().to(dist.device()) if g is not None else torch.zeros((), dtype=torch.float64,
                                                                                          device=dist.device())

    def step(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()
        self._micro = 0

    def skip_step(self) -> None:
        raise RuntimeError("DeepSpeed cannot skip a step")   # refused at construction; unreachable

    # ---- EMA layout: this rank's fp32 master elements (ZeRO-3 partitions, ZeRO-1/2 fragments); no full replica
    @property
    def _sharded_ema(self) -> bool:
        return self.stage == 3 or self._fragments

    def ema_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                out[n] = safe_get_local_fp32_param(p)                  # (partition,), zero-padded
            elif self._fragments:                                       # (fragment,), possibly empty on this rank
                out[n] = p._hp_mapping.hp_fragment if p._hp_mapping is not None else self._empty
            else:
                out[n] = p
        return out

    def _full_from_local(self, local: torch.Tensor, p) -> torch.Tensor:
        """The full tensor of parameter ``p`` from every rank's part (collective)."""
        if self.stage == 3:
            parts = [torch.empty_like(local) for _ in range(self.world)]
            tdist.all_gather(parts, local.contiguous())
            return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=dist.device())
        if p._hp_mapping is not None:
            addr = p._hp_mapping.lp_fragment_address
            buf.narrow(0, addr.start, addr.numel).copy_(local)
        return dist.all_reduce_sum(buf).view(p.shape)

    def full_state_dict(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        params = dict(self.module.named_parameters())
        out = {}
        for k, v in tensors.items():
            full = self._full_from_local(v, params[k]) if self._sharded_ema else v
            if dist.get_rank() == 0:
                out[k] = full.detach().float().cpu()
        return out if dist.get_rank() == 0 else None

    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None:
        from deepspeed.utils import safe_get_full_fp32_param

        keys = list(self.module.state_dict().keys())
        params, buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        out = {}
        for k in keys:   # fp32 masters (a collective per tensor), persistent buffers as they are
            t = safe_get_full_fp32_param(params[k]) if k in params else buffers[k]
            if dist.get_rank() == 0:
                out[k] = t.detach().float().cpu() if k in params else t.detach().cpu()
        return out if dist.get_rank() == 0 else None

    def load_full_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Full weights into the fp32 masters and the module's (possibly partitioned, low-precision) parameters."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param

        params = dict(self.module.named_parameters())
        missing = sorted(set(params) - set(state))
        if missing:
            raise KeyError(f"weights lack parameters {missing[:5]}")
        for k, p in params.items():
            value = state[k].to(dist.device(), torch.float32)
            if self.stage == 3:
                safe_set_local_fp32_param(p, self._local_of(p, value))
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if dist.get_rank() == 0:
                        p.data.copy_(value.to(p.dtype))
            else:
                safe_set_full_fp32_param(p, value)
                with torch.no_grad():
                    p.data.copy_(value.to(p.dtype))

    def shard_like_params(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self._sharded_ema:
            return super().shard_like_params(full)
        params = dict(self.module.named_parameters())
        missing = sorted(set(k for k, p in params.items() if p.requires_grad) - set(full))
        if missing:
            raise KeyError(f"weights lack parameters {missing[:5]}")
        return {k: self._local_of(params[k], v) for k, v in full.items()}

    def _local_of(self, p, full: torch.Tensor) -> torch.Tensor:
        """This rank's elements of the full tensor ``full`` of parameter ``p`` (layout of ``ema_params()``)."""
        flat = full.flatten().to(dist.device(), torch.float32)
        if self.stage == 3:
            n = p.ds_tensor.ds_numel                               # partition size (equal on all ranks, zero-padded)
            padded = torch.zeros(n * self.world, dtype=torch.float32, device=dist.device())
            padded[: p.ds_numel] = flat
            return padded[dist.get_rank() * n:(dist.get_rank() + 1) * n].clone()
        if p._hp_mapping is None:
            return self._empty.clone()
        addr = p._hp_mapping.lp_fragment_address
        return flat.narrow(0, addr.start, addr.numel).to(p._hp_mapping.hp_fragment.device).clone()

    # ---- checkpoints: DeepSpeed's own format for model + optimizer, EMA next to it
    def save(self, path: str, ema_state: dict) -> None:
        self.engine.save_checkpoint(os.path.join(path, "deepspeed"), tag="state", save_latest=False)
        ema = {"shadow": {k: v.detach().cpu() for k, v in ema_state["shadow"].items()},
               "num_updates": int(ema_state["num_updates"])}
        if self._sharded_ema:   # this rank's elements; resumed on another world size from ema.safetensors
            torch.save(ema, os.path.join(path, f"ema_rank{dist.get_rank()}.pt"))
        elif dist.get_rank() == 0:
            torch.save(ema, os.path.join(path, "ema.pt"))
        if dist.get_rank() == 0:
            with open(os.path.join(path, "zero.json"), "w") as f:
                json.dump({"stage": self.stage, "world_size": self.world}, f)
        dist.barrier()

    def load(self, path: str, ema_state: dict) -> dict:
        meta_f = os.path.join(path, "zero.json")
        if not os.path.exists(meta_f):
            raise FileNotFoundError(f"checkpoint file missing: {meta_f} (written by another strategy? zero* reads "
                                    "DeepSpeed checkpoints)")
        with open(meta_f) as f:
            meta = json.load(f)
        if meta["stage"] != self.stage:
            raise ValueError(f"{path}: a ZeRO-{meta['stage']} checkpoint cannot resume as ZeRO-{self.stage} "
                             f"(resume with strategy=zero{meta['stage']}, the stage it was saved with)")
        resharded = meta["world_size"] != self.world
        ds_dir = self._universal(path) if resharded else os.path.join(path, "deepspeed")
        # A checkpoint of another world size loads through DeepSpeed's universal format (per-parameter fp32
        # weights and optimizer moments, re-partitioned for this world); the engine reads that flag at load time.
        self.engine._config.load_universal_checkpoint = resharded
        try:
            load_path, _ = self.engine.load_checkpoint(ds_dir, tag="state", load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        except Exception as e:
            raise ValueError(f"corrupt or unreadable DeepSpeed checkpoint {ds_dir}: {e}") from None
        finally:
            self.engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise FileNotFoundError(f"checkpoint file missing: DeepSpeed state under {ds_dir}")
        steps_on_param_devices(self.base_optimizer)
        if resharded and self._sharded_ema:
            return self._resharded_ema(path)
        f = os.path.join(path, f"ema_rank{dist.get_rank()}.pt" if self._sharded_ema else "ema.pt")
        return load_state_file(f, dist.device())

    def _resharded_ema(self, path: str) -> dict:
        """The EMA of a checkpoint saved by another world size: this rank's part of the consolidated export
        (ema.safetensors, fp32, written with every checkpoint); the update count from the old rank 0's file."""
        full = load_weights(os.path.join(path, "ema.safetensors"))
        return {"shadow": self.shard_like_params(full),
                "num_updates": int(load_state_file(os.path.join(path, "ema_rank0.pt"), dist.device())["num_updates"])}

    def _universal(self, path: str) -> str:
        """``path``'s DeepSpeed state in the universal format, converted once by rank 0 into
        ``path/deepspeed_universal`` (a temporary folder renamed when complete; reused by later resumes)."""
        out = os.path.join(path, "deepspeed_universal")
        err = None
        if dist.get_rank() == 0 and not os.path.isdir(out):
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            for stale in glob.glob(f"{out}.tmp*"):   # left by a conversion that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp = f"{out}.tmp{os.getpid()}"
            workers = max(1, min(4, os.cpu_count() or 1))
            args = argparse.Namespace(input_folder=os.path.join(path, "deepspeed", "state"),
                                      output_folder=os.path.join(tmp, "state"), num_extract_workers=workers,
                                      num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            try:
                ds_to_universal(args)
                os.replace(tmp, out)
            except Exception as e:   # every rank must hear of it, not wait at the barrier
                shutil.rmtree(tmp, ignore_errors=True)
                err = f"{path}: converting the ZeRO checkpoint to DeepSpeed's universal format failed: {e!r}"
        if dist.any_rank(err is not None, dist.device()):
            raise ValueError(err or f"{path}: rank 0 could not convert the checkpoint to DeepSpeed's universal format")
        return out

    def close(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.destroy()
        self.engine = self.model = self.module = self.optimizer = None
