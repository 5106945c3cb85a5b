"""The training loop: one readable function that counts images seen.

Order per iteration: stop/checkpoint/done checks → fetch batch → accumulate → clip → step → EMA →
log / snapshot. Everything it calls (loss, strategy, EMA, checkpoints, logger) is an object; the
maths lives in those objects. Progress (LR, cadences, the end) is measured in images seen, so it
does not shift when the world size or the per-GPU batch changes.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from . import dist
from .flops import peak_tflops, train_flops_per_image
from .lr_schedule import learning_rate
from .objective import draw_noise, flow_loss


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint."""

    nimg: int = 0
    step: int = 0
    last_loss: float = float("nan")
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)


class NonFiniteError(RuntimeError):
    """Raised when the loss or gradient is not finite and the run is configured to stop."""


def crossed(before: int, after: int, every: int) -> bool:
    """True when [before, after) passed a multiple of ``every`` (cadence in images)."""
    return every > 0 and after // every > before // every


def peak_memory_gb() -> dict:
    """Peak accelerator memory (GPU) or peak resident set size of this process (CPU), in GiB."""
    if torch.cuda.is_available():
        return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train(cfg, strategy, loader, ema, state: TrainState, save_checkpoint, logger, stop_flag,
          snapshot=None) -> str:
    """Train until ``cfg.train.total_nimg``; returns "done" or "stopped" (signal: checkpoint saved)."""
    sched, dev = cfg.train, dist.device()
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = sched.global_batch // world
    micro = sched.micro_batch or per_rank
    if per_rank * world != sched.global_batch or per_rank % micro:
        raise ValueError(f"global_batch {sched.global_batch} must split into world {world} × micro_batch {micro} × accumulation")
    pbar = None
    if rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        pbar = tqdm(total=sched.total_nimg, initial=state.nimg, unit="img", unit_scale=True, dynamic_ncols=True)
    null_class = strategy.module.cfg.num_classes
    peak = peak_tflops(cfg.logging.peak_tflops)
    it = iter(loader)
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "nimg0": state.nimg, "tokens": 0, "flops": 0.0}

    while True:
        # ---- step boundary: signals (all ranks agree), the end, then the next batch
        if dist.any_rank(stop_flag.set, dev):
            save_checkpoint(state)
            status = "stopped"
            break
        if state.nimg >= sched.total_nimg:
            save_checkpoint(state)
            status = "done"
            break
        batch = next(it)
        x, y = batch["x"].to(dev, non_blocking=True), batch["y"].to(dev, non_blocking=True)
        nimg_step = int(batch.get("nimg_global", x.shape[0] * world))
        # Rank r holds global positions [nimg + r·B, nimg + (r+1)·B) of this step (loader contract).
        first = state.nimg + rank * x.shape[0]
        noise = draw_noise(cfg.objective, sched.seed, list(range(first, first + x.shape[0])), tuple(x.shape[1:])).to(dev)

        # ---- forward/backward over micro-batches; the loss is the mean over this rank's batch
        loss_sum = torch.zeros((), device=dev)
        n_micro = math.ceil(x.shape[0] / micro)
        for i in range(n_micro):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            with strategy.no_sync(i < n_micro - 1), strategy.autocast():
                per_sample = flow_loss(strategy.model, xs, ys, noise.slice(i * micro, (i + 1) * micro),
                                       null_class)                                 # (micro,)
                loss = per_sample.sum() / x.shape[0]
            strategy.backward(loss)
            loss_sum += loss.detach()
        grad_norm = strategy.clip_grad_norm(cfg.optim.grad_clip)

        # ---- optimizer step, unless the step is not finite
        bad = dist.any_rank(not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)), dev)
        if bad and cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss ({loss_sum.item()}) or grad norm ({float(grad_norm)}) at nimg={state.nimg}; "
                                 "the last complete checkpoint is untouched")
        lr = learning_rate(state.nimg, cfg.optim.lr, cfg.optim.warmup_nimg)
        if bad:
            strategy.skip_step()
            state.skipped_steps += 1
        else:
            strategy.step(lr)
            ema.update(strategy.ema_params())
        before = state.nimg
        state.nimg += nimg_step
        state.step += 1
        loss_val = dist.all_reduce_sum(loss_sum.clone()).item() / world
        state.last_loss = loss_val
        window["loss"] += loss_val
        window["n"] += 1
        # Buckets may change shape from step to step: count tokens and FLOPs per step.
        p = strategy.module.patch_size
        window["tokens"] += nimg_step * (x.shape[-2] // p) * (x.shape[-1] // p)
        window["flops"] += nimg_step * train_flops_per_image(cfg.model.name, cfg.model.overrides, x.shape[-2], x.shape[-1])
        if pbar is not None:
            pbar.update(nimg_step)
            pbar.set_postfix(loss=f"{loss_val:.4f}")

        # ---- cadences, all measured in images
        if crossed(before, state.nimg, sched.log_every_nimg) or state.nimg >= sched.total_nimg:
            dt = time.perf_counter() - window["t0"]
            imgs = state.nimg - window["nimg0"]
            rec = {"nimg": state.nimg, "step": state.step, "loss": window["loss"] / window["n"], "lr": lr,
                   "grad_norm": float(grad_norm), "img_per_s": imgs / dt, "tok_per_s": window["tokens"] / dt,
                   "tflops_per_gpu": window["flops"] / dt / world / 1e12, "skipped": state.skipped_steps}
            if peak > 0:
                rec["mfu"] = rec["tflops_per_gpu"] / peak
            rec.update(peak_memory_gb())
            logger.log(rec, echo=pbar is None)
            window.update(loss=0.0, n=0, t0=time.perf_counter(), nimg0=state.nimg, tokens=0, flops=0.0)
        if snapshot is not None and crossed(before, state.nimg, sched.snapshot_every_nimg):
            snapshot(state.nimg)
        if crossed(before, state.nimg, sched.checkpoint_every_nimg) and state.nimg < sched.total_nimg:
            save_checkpoint(state)
    if pbar is not None:
        pbar.close()
    return status
