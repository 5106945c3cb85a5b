"""Evaluation entry point: ``[torchrun ...] python -m evaluation.run model.ckpt=... vae=... [overrides]``.

For each resolution: sample N class-balanced images (resumable chunks, any number of ranks), compute
Inception features on the fly, all-reduce float64 statistics, and report FID / sFID / IS /
precision / recall against the reference. Writes, under ``<out_dir>/<run_name>/``:
  config.json, metrics.json (every metric, the exact config, the checkpoint's sha256), results.md,
  and per resolution ``<H>x<W>/``: chunks/, stats.safetensors, grid.png, [samples.npz].
"""
from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import asdict

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from . import dist
from .config import EvalConfig
from .inception import build_extractor
from .metrics import frechet_distance, inception_score, precision_recall
from .reference import load_reference
from .report import fsync_replace, make_grid, markdown_row, save_png, write_adm_npz, write_json, write_markdown
from .sample import (ChunkSampler, ChunkStore, load_eval_model, pool_features, run_sampling,
                     sampling_fingerprint, stored_images)


def default_run_name(cfg: EvalConfig, weights_path: str) -> str:
    """<checkpoint>-<solver><steps>-cfg<scale>-n<N>-seed<seed>, filesystem-safe (from the resolved weights file)."""
    stem = os.path.splitext(os.path.basename(weights_path))[0]
    if stem in ("ema", "model"):  # trainer layout: name the run after the checkpoint directory (nimg_...)
        stem = os.path.basename(os.path.dirname(os.path.abspath(weights_path)))
    s = cfg.sampling
    name = f"{stem}-{s.solver}{s.steps}-cfg{s.cfg_scale:g}-n{s.num_samples}-seed{s.seed}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _check_resolution(res, downsample: int, patch: int) -> tuple[int, int]:
    """(h, w) of a [height, width] entry, which must be a multiple of VAE downsampling x patch size."""
    if len(res) != 2:
        raise ValueError(f"resolutions: each entry must be [height, width], got {res}")
    h, w = int(res[0]), int(res[1])
    q = downsample * patch
    if h % q or w % q:
        raise ValueError(f"resolution {h}x{w}: height and width must be multiples of VAE downsampling x patch = {q}")
    return h, w


def evaluate(cfg: EvalConfig, stop_after_chunks: int | None = None) -> dict:
    """Run the whole job; returns the metrics dict written to metrics.json (on every rank)."""
    from data_pipeline.vae import build_vae

    t_start = time.time()
    device = dist.init(cfg.device)
    torch.backends.cudnn.allow_tf32 = cfg.tf32   # only GPU convolutions read it
    rank = dist.get_rank()
    loaded = load_eval_model(cfg.model, device)
    model = loaded.model
    vae = build_vae(cfg.vae, device=device)
    if vae.latent_channels != model.in_channels:
        raise ValueError(f"VAE {cfg.vae!r} has {vae.latent_channels} latent channels, model {loaded.name} takes "
                         f"{model.in_channels}")
    extractor = build_extractor(cfg.metrics.extractor, cfg.metrics.inception_weights, device)
    dims = dict(extractor.dims)
    run_dir = os.path.join(cfg.out_dir, cfg.run_name or default_run_name(cfg, loaded.path))
    cfg_dict = asdict(cfg)
    if rank == 0:
        write_json(os.path.join(run_dir, "config.json"), cfg_dict)
    ref = load_reference(cfg.reference, extractor, dims, device, cfg.reference.cache_dir or os.path.join(cfg.out_dir, "ref_cache"),
                         sfid=cfg.metrics.sfid, batch_size=cfg.metrics.batch_size)
    if ref is None:
        dist.print0("[eval] no reference configured (reference.npz / reference.images): FID, sFID, precision and "
                    "recall are reported as null; IS is still computed")
    from .sample import build_velocity_fn

    velocity = build_velocity_fn(model, cfg.sampling)
    keep_below = cfg.sampling.num_samples if cfg.save_npz else cfg.grid_size
    results, rows = [], []
    for res in cfg.resolutions:
        h, w = _check_resolution(res, vae.downsample, model.patch_size)
        res_dir = os.path.join(run_dir, f"{h}x{w}")
        fp = sampling_fingerprint(loaded, getattr(vae, "vae_id", cfg.vae), (h, w), cfg.sampling, extractor.name, keep_below,
                                  fp32_gpu_convs=device.type == "cuda" and not cfg.tf32)
        store = ChunkStore(os.path.join(res_dir, "chunks"), fp, cfg.sampling.num_samples, cfg.sampling.chunk_size)
        sampler = ChunkSampler(velocity, vae, extractor, (h // vae.downsample, w // vae.downsample), model.in_channels,
                               model.cfg.num_classes, cfg.sampling, cfg.metrics, device, keep_images_below=keep_below)
        out = run_sampling(sampler, store, dims, cfg.metrics, device, desc=f"{h}x{w}", stop_after_chunks=stop_after_chunks)
        mu, sigma = out.pool.mean_cov()
        stats = {"mu": mu, "sigma": sigma}
        if out.spatial is not None:
            stats["mu_s"], stats["sigma_s"] = out.spatial.mean_cov()
        is_mean, is_std = inception_score(out.inception)
        m = {"fid": None, "sfid": None, "is": is_mean, "is_std": is_std, "precision": None, "recall": None}
        if rank == 0:
            if ref is not None:
                m["fid"] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
                if "mu_s" in stats and "mu_s" in ref:
                    m["sfid"] = frechet_distance(stats["mu_s"], stats["sigma_s"], ref["mu_s"], ref["sigma_s"])
                if "pr_features" in ref and len(ref["pr_features"]) > cfg.metrics.pr_k:
                    fake = pool_features(store, cfg.metrics.pr_max_samples)
                    m["precision"], m["recall"] = precision_recall(ref["pr_features"], fake, k=cfg.metrics.pr_k,
                                                                   device=device)
            _write_resolution_outputs(cfg, store, res_dir, stats, h, w, model.cfg.num_classes)
        r = {"resolution": [h, w], "num_samples": cfg.sampling.num_samples, "metrics": m,
             "checkpoint": {"path": loaded.path, "sha256": loaded.sha256, "name": loaded.name,
                            "overrides": loaded.overrides, "format": loaded.format},
             "sampling": asdict(cfg.sampling), "chunks_generated_this_run": out.chunks_generated,
             "sampling_seconds": round(out.seconds, 2),
             "features": {"extractor": extractor.name, "pool_dim": dims["pool"],
                          "spatial": "Mixed_6d 1x1 branch (ADM mixed_6/conv), first 7 channels, 17x17, (h,w,c) order"
                          if cfg.metrics.extractor == "inception" else f"tiny extractor, {dims['spatial']}-d",
                          "is_logits": f"{dims['logits']}-way, no fc bias", "is_splits": cfg.metrics.is_splits}}
        results.append(r)
        rows.append(markdown_row(r))
        dist.print0(f"[eval] {h}x{w}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in m.items()))
    report = {"results": results, "config": cfg_dict, "world_size": dist.get_world_size(),
              "reference": None if ref is None else {"source": ref["source"], "stats_from": ref["stats_from"]},
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "seconds": round(time.time() - t_start, 2),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rank == 0:
        write_json(os.path.join(run_dir, "metrics.json"), report)
        write_markdown(os.path.join(run_dir, "results.md"), rows)
        print(f"[eval] wrote {os.path.join(run_dir, 'metrics.json')} and results.md", flush=True)
        if cfg.wandb.enabled:
            _log_wandb(cfg, report, run_dir)
    dist.barrier()
    return report


def _write_resolution_outputs(cfg: EvalConfig, store: ChunkStore, res_dir: str, stats: dict, h: int, w: int,
                              num_classes: int) -> None:
    """stats.safetensors, grid.png and (optionally) samples.npz for one resolution (rank 0)."""
    tmp = os.path.join(res_dir, f"stats.safetensors.tmp.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in stats.items()}, tmp)
    fsync_replace(tmp, os.path.join(res_dir, "stats.safetensors"))
    n_grid = min(cfg.grid_size, cfg.sampling.num_samples)
    if n_grid > 0:
        imgs = torch.cat([im for _, im in stored_images(store, n_grid)])
        save_png(os.path.join(res_dir, "grid.png"), make_grid(imgs))
    if cfg.save_npz:
        import numpy as np

        from .sample import class_labels
        labels = class_labels(torch.arange(cfg.sampling.num_samples), num_classes).numpy()
        write_adm_npz(os.path.join(res_dir, "samples.npz"), stored_images(store), cfg.sampling.num_samples, h, w,
                      np.asarray(labels))


def _log_wandb(cfg: EvalConfig, report: dict, run_dir: str) -> None:
    """Metrics and grids of every resolution to wandb (offline unless configured)."""
    import wandb

    run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name or os.path.basename(run_dir), mode=cfg.wandb.mode,
                     dir=run_dir, config=report["config"], job_type="eval")
    for r in report["results"]:
        tag = f"{r['resolution'][0]}x{r['resolution'][1]}"
        run.log({f"{tag}/{k}": v for k, v in r["metrics"].items() if v is not None})
        grid = os.path.join(run_dir, tag, "grid.png")
        if os.path.isfile(grid):
            run.log({f"{tag}/samples": wandb.Image(grid)})
    run.finish()


def to_config(cfg: DictConfig) -> EvalConfig:
    """Validate a Hydra/OmegaConf config against the EvalConfig schema and convert it once."""
    merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg)
    return OmegaConf.to_object(merged)


@hydra.main(version_base="1.3", config_path="../configs/eval", config_name="fid50k")
def main(cfg: DictConfig) -> None:
    """Hydra entry (configs/eval/fid50k.yaml)."""
    try:
        evaluate(to_config(cfg))
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
