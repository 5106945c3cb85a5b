"""The training loop: one readable function that counts images seen.

Order per iteration: stop/checkpoint/done checks → fetch batch → accumulate → clip → step → EMA →
log / snapshot. Everything it calls (loss, strategy, EMA, checkpoints, logger) is an object; the
maths lives in those objects. Progress (LR, cadences, the end) is measured in images seen, so it
does not shift when the world size or the per-GPU batch changes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import dist
from .lr_schedule import learning_rate


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


def step_generator(seed: int, rank: int, nimg: int) -> torch.Generator:
    """Noise/time/label-dropout RNG of one step: a pure function of (seed, rank, images seen).

    Resuming needs no saved RNG state, and the draws never depend on the world size's history.
    """
    s = np.random.SeedSequence([seed, rank, nimg]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


def crossed(before: int, after: int, every: int) -> bool:
    """True when [before, after) passed a multiple of ``every`` (cadence in images)."""
    return every > 0 and after // every > before // every


def train(cfg, strategy, loader, loss_fn, ema, state: TrainState, save_checkpoint, logger, stop_flag,
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
    it = iter(loader)
    window = {"loss": 0.0, "n": 0, "t0": time.perf_counter(), "nimg0": state.nimg}

    while True:
        # ---- step boundary: signals (all ranks agree), the end, then the next batch
        if dist.any_rank(stop_flag.set, dev):
            save_checkpoint(state)
            return "stopped"
        if state.nimg >= sched.total_nimg:
            save_checkpoint(state)
            break
        batch = next(it)
        x, y = batch["x"].to(dev, non_blocking=True), batch["y"].to(dev, non_blocking=True)
        nimg_step = int(batch.get("nimg_global", x.shape[0] * world))
        gen = step_generator(sched.seed, rank, state.nimg)

        # ---- forward/backward over micro-batches; the loss is the mean over this rank's batch
        loss_sum = torch.zeros((), device=dev)
        n_micro = math.ceil(x.shape[0] / micro)
        for i in range(n_micro):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            with strategy.no_sync(i < n_micro - 1), strategy.autocast():
                per_sample = loss_fn(strategy.model, xs, ys, gen)                 # (micro,)
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
        if pbar is not None:
            pbar.update(nimg_step)
            pbar.set_postfix(loss=f"{loss_val:.4f}")

        # ---- cadences, all measured in images
        if crossed(before, state.nimg, sched.log_every_nimg) or state.nimg >= sched.total_nimg:
            dt = time.perf_counter() - window["t0"]
            imgs = state.nimg - window["nimg0"]
            tokens = imgs * (x.shape[-2] // strategy.module.patch_size) * (x.shape[-1] // strategy.module.patch_size)
            rec = {"nimg": state.nimg, "step": state.step, "loss": window["loss"] / window["n"], "lr": lr,
                   "grad_norm": float(grad_norm), "img_per_s": imgs / dt, "tok_per_s": tokens / dt,
                   "skipped": state.skipped_steps}
            if torch.cuda.is_available():
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            logger.log(rec, echo=pbar is None)
            window.update(loss=0.0, n=0, t0=time.perf_counter(), nimg0=state.nimg)
        if snapshot is not None and crossed(before, state.nimg, sched.snapshot_every_nimg):
            snapshot(state.nimg)
        if crossed(before, state.nimg, sched.checkpoint_every_nimg) and state.nimg < sched.total_nimg:
            save_checkpoint(state)
    if pbar is not None:
        pbar.close()
    return "done"
