"""Training entry point: ``python -m trainer.train [hydra overrides]`` (console script ``flowdcn-train``).

Composes configs/train.yaml, converts it once into the typed TrainConfig, builds data, model,
strategy, EMA and checkpoints, resumes from the newest complete checkpoint in ``run_dir`` (or
initialises from ``init_from``), runs the loop, and writes the final exports. Re-running the same
command resumes. Exit codes: 0 done, ``signals.exit_code`` (3) stopped by a signal after saving
(``{run_dir}/STOPPED.json`` says so too: torchrun reports 1 whatever its workers return). A non-finite
step raises ``trainer.loop.NonFiniteError`` before anything is saved.
"""
from __future__ import annotations

import json
import os
import random
import sys

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf

from modeling import build_model

from . import dist
from .checkpoint import (CheckpointManager, atomic_write_text, load_state_file, load_weights, read_json, read_meta,
                         save_safetensors)
from .config import TrainConfig
from .ema import EMA
from .logger import MetricLogger, read_metrics
from .loop import TrainState, train
from .parallel import build_strategy
from .signals import StopFlag

from hydra.core.config_store import ConfigStore

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# The typed schema is the base of configs/train.yaml: every key exists (CLI overrides of any field work)
# and Hydra type-checks the composed config.
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def to_typed(cfg) -> tuple[TrainConfig, dict]:
    """Hydra DictConfig -> (TrainConfig, resolved plain dict); unknown keys and wrong types raise here."""
    merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    return OmegaConf.to_object(merged), OmegaConf.to_container(merged, resolve=True)


def build_data(cfg: TrainConfig, rank: int, world: int):
    """The batch source: built-in digits or latent shards (data_pipeline.loader)."""
    if cfg.data.kind == "digits":
        from data_pipeline.digits import DigitsSource

        if cfg.data.digits.global_batch != cfg.train.global_batch:
            raise ValueError(f"data.digits.global_batch ({cfg.data.digits.global_batch}) != train.global_batch ({cfg.train.global_batch})")
        return DigitsSource(cfg.data.digits, rank, world)
    if cfg.data.kind == "latents":
        from data_pipeline.loader import LoaderConfig, build_loader

        return build_loader(LoaderConfig(**cfg.data.latents), rank, world)
    raise ValueError(f"unknown data.kind {cfg.data.kind!r} (digits | latents)")


def rng_state() -> dict:
    """This rank's global RNG states as tensors and plain types (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    st = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
          "python": [version, list(py_state), gauss_next]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def restore_rng(path: str) -> None:
    """Restore this rank's global RNG states (training noise does not use them; previews and user code may)."""
    if not os.path.exists(path):   # a checkpoint from a different world size: keep the seeded state
        return
    st = load_state_file(path)
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, py_state, gauss_next = st["python"]
    random.setstate((version, tuple(py_state), gauss_next))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def run(cfg: TrainConfig, config_dict: dict) -> int:
    """Train one run described by ``cfg``; returns the process exit code (0 done, signals.exit_code stopped)."""
    dist.init(cfg.strategy.backend)
    with StopFlag(cfg.signals.signals) as stop_flag:
        return _run(cfg, config_dict, stop_flag)


def _run(cfg: TrainConfig, config_dict: dict, stop_flag: StopFlag) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.train.seed)   # model init is identical on every rank (fsdp: built on rank 0 only)
    on_gpu = dist.device().type == "cuda"
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS refuses deterministic mode without it
        if on_gpu:
            dist.print0("[deterministic] GPU: the MSDCN CUDA backward (grad_value summed in atomic order) and "
                        "grid_sample's backward have no deterministic kernel; they warn instead of failing, and runs are "
                        "bitwise repeatable on CPU only")
    # Set both ways: run() may be called again. On GPUs warn_only, so that the CPU smoke presets (deterministic: true)
    # also run there instead of failing at the first backward.
    torch.use_deterministic_algorithms(cfg.train.deterministic, warn_only=on_gpu)
    os.makedirs(cfg.run_dir, exist_ok=True)
    stopped_marker = os.path.join(cfg.run_dir, "STOPPED.json")
    if rank == 0 and os.path.exists(stopped_marker):
        os.remove(stopped_marker)

    loader = build_data(cfg, rank, world)
    mcfg = cfg.model

    def make_model(device):
        return build_model(mcfg.name, device=device, **mcfg.overrides)

    def make_optimizer(params):
        o = cfg.optim
        fused = o.fused if o.fused is not None else (dist.device().type == "cuda" or None)
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=fused)

    strategy = build_strategy(cfg.strategy, cfg.train, cfg.optim)
    strategy.setup(make_model, make_optimizer)
    opt = strategy.base_optimizer
    fused = any(g.get("fused") for g in opt.param_groups)
    dist.print0(f"[setup] strategy={cfg.strategy.name} world={world} device={dist.device()} "
                f"precision={cfg.train.precision} compile={cfg.train.compile} "
                f"optimizer={type(opt).__name__}{' (fused)' if fused else ''}")
    ema = EMA(strategy.ema_params(), cfg.ema.decay, cfg.ema.warmup_steps)
    ckpt = CheckpointManager(cfg.run_dir, cfg.train.keep_last, cfg.train.keep_every_nimg)
    state = TrainState()
    wandb_id = None

    latest = ckpt.latest()
    if latest is not None:
        meta = read_meta(latest)
        ema.load_state_dict(strategy.load(latest, ema.state_dict()))
        loader.load_state_dict(read_json(os.path.join(latest, "loader.json")))
        if meta.get("world_size") == world:
            restore_rng(os.path.join(latest, f"rng_rank{rank}.pt"))
        state = TrainState(**meta["state"])
        wandb_id = meta.get("wandb_id")
        dist.print0(f"[resume] {latest}: nimg={state.nimg} step={state.step} (saved by {meta.get('world_size')} "
                    f"process(es), now {world})")
        if rank == 0:   # drop log lines written after this checkpoint (a crash between checkpoints)
            recs = [r for r in read_metrics(cfg.run_dir) if r.get("nimg", 0) <= state.nimg]
            atomic_write_text(os.path.join(cfg.run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
    elif cfg.init_from:
        # A new stage: weights and EMA of the previous stage, fresh optimizer and data position.
        src = cfg.init_from
        ema_sd = load_weights(src)
        model_sd = load_weights(os.path.join(src, "model.safetensors")) if os.path.isdir(src) else ema_sd
        strategy.load_full_weights(model_sd)
        ema.load_state_dict({"shadow": strategy.shard_like_params(ema_sd), "num_updates": 0})
        dist.print0(f"[init] weights and EMA from {src}")
    dist.barrier()

    logger = MetricLogger(cfg.run_dir, cfg.logging, config_dict, wandb_id)
    meta_model = {"model": mcfg.name, "model_overrides": json.dumps(mcfg.overrides)}
    saved = {"nimg": state.nimg if latest is not None else -1}

    def save_checkpoint(st: TrainState) -> None:
        if saved["nimg"] == st.nimg:   # e.g. a signal right after a checkpoint, or resuming at the end
            return
        tmp = ckpt.begin(st.nimg)
        strategy.save(tmp, ema.state_dict())
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        full_ema = strategy.full_state_dict(ema.shadow)
        full_model = strategy.full_model_state_dict()
        if rank == 0:
            md = {**meta_model, "nimg": str(st.nimg)}
            save_safetensors(full_ema, os.path.join(tmp, "ema.safetensors"), md)
            save_safetensors(full_model, os.path.join(tmp, "model.safetensors"), md)
            atomic_write_text(os.path.join(tmp, "loader.json"), json.dumps(loader.state_dict()))
            meta = {"state": st.__dict__, "world_size": world, "strategy": cfg.strategy.name,
                    "backend": torch.distributed.get_backend() if dist.is_dist() else None,   # as resolved; None: no process group
                    "wandb_id": logger.wandb_id, "config": config_dict}
            atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str))
        path = ckpt.commit(tmp, st.nimg)
        saved["nimg"] = st.nimg
        dist.print0(f"[checkpoint] {path}")

    def snapshot(nimg: int) -> None:
        write_samples(cfg, strategy, ema, os.path.join(cfg.run_dir, "samples", f"grid_{nimg:012d}.png"))

    try:
        status = train(cfg, strategy, loader, ema, state, save_checkpoint, logger, stop_flag, snapshot)
        if status == "stopped":
            dist.print0(f"[signal] {stop_flag.received}: checkpoint saved at nimg={state.nimg}; "
                        f"exiting with {cfg.signals.exit_code}")
            if rank == 0:
                atomic_write_text(stopped_marker, json.dumps({
                    "signal": stop_flag.received, "nimg": state.nimg, "checkpoint": ckpt.latest(),
                    "exit_code": cfg.signals.exit_code}, indent=1))
            dist.barrier()
            return cfg.signals.exit_code

        samples = write_samples(cfg, strategy, ema, os.path.join(cfg.run_dir, "samples.png"))
        if rank == 0:
            from .preview import save_loss_curve

            save_loss_curve(read_metrics(cfg.run_dir), os.path.join(cfg.run_dir, "loss.png"))
            result = {"nimg": state.nimg, "checkpoint": ckpt.latest(), "last_loss": state.last_loss,
                      "step": state.step, "skipped_steps": state.skipped_steps}
            if cfg.demo_eval and samples is not None:
                from .demo import digits_classifier_accuracy

                acc, real_acc = digits_classifier_accuracy(*samples)
                result.update(sample_accuracy=acc, real_accuracy=real_acc)
                print(f"[demo] classifier accuracy on generated digits: {acc:.1%} (on held-out real digits: {real_acc:.1%})")
            atomic_write_text(os.path.join(cfg.run_dir, "DONE.json"), json.dumps(result, indent=1))
            print(f"[done] {cfg.run_dir}: samples.png, loss.png, DONE.json")
        dist.barrier()
        return 0
    finally:
        logger.finish()
        strategy.close()


def write_samples(cfg: TrainConfig, strategy, ema, path: str):
    """Class-by-class sample grid from the EMA weights (rank 0); returns (samples, labels) or None."""
    full = strategy.full_state_dict(ema.shadow)
    if dist.get_rank() != 0:
        return None
    from .preview import build_ema_model, sample_class_grid, save_grid

    p = cfg.preview
    model = build_ema_model(cfg.model.name, cfg.model.overrides, full, dist.device())
    n_cls = min(p.num_classes_shown, model.cfg.num_classes)
    x = sample_class_grid(model, list(range(n_cls)), p.per_class, preview_shape(cfg, model), p.sampler, p.cfg_scale,
                          model.cfg.num_classes, p.seed, dist.device())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # One row per class; pixel-space data is shown as is, latents as their first 3 channels.
    save_grid(x[:, :3], n_cls, path)
    labels = torch.arange(n_cls).repeat_interleave(p.per_class)
    return x, labels


def preview_shape(cfg: TrainConfig, model) -> tuple[int, int, int]:
    """(C, H, W) of preview samples: the digits resolution, else 32×32 latents (one size for every bucket)."""
    if cfg.data.kind == "digits":
        r = cfg.data.digits.resolution
        return (model.in_channels, r, r)
    return (model.in_channels, 32, 32)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(cfg) -> None:
    code = run(*to_typed(cfg))
    dist.destroy()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
