"""Checkpoint loading and distributed, resumable, class-balanced sampling with features computed on the fly.

Sample i (0 <= i < N) has label ``i mod num_classes`` (class-balanced for every prefix, e.g. 50 per class for
50K; every contiguous IS split of N/10 samples is balanced too) and initial noise / SDE noise drawn from
generators seeded by (seed, i) only (``modeling.samplers.noise_for_indices``). Samples are grouped in
fixed chunks of ``chunk_size`` consecutive indices, each generated in fixed batches, so the images and
features do not depend on the number of ranks. A finished chunk is one atomically written safetensors
file with its features; a rerun of the same command generates only the missing chunks.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data_pipeline.shards import sha256_file

from . import dist
from .config import MetricsConfig, ModelLoadConfig, SamplingConfig
from .stats import FeatureStats, ISStats

CHUNK_FORMAT = "flowdcn-eval-chunk-v1"


# ----------------------------------------------------------------------------- checkpoints
file_sha256 = sha256_file   # one streaming hash for shards and checkpoints


@dataclass
class LoadedModel:
    """A model ready for sampling plus what the report needs to identify it."""

    model: torch.nn.Module
    name: str
    overrides: dict
    path: str
    sha256: str
    format: str                       # "safetensors" | "official"


COMPLETE_MARKER = "COMPLETE"   # the trainer writes it last into a finished checkpoint directory


def _latest_complete(ckpt_root: str) -> str | None:
    """The newest ``nimg_*`` directory with the COMPLETE marker under a trainer run's checkpoints folder."""
    names = sorted(n for n in os.listdir(ckpt_root) if n.startswith("nimg_")
                   and os.path.isfile(os.path.join(ckpt_root, n, COMPLETE_MARKER)))
    return os.path.join(ckpt_root, names[-1]) if names else None


def resolve_checkpoint(ckpt: str) -> tuple[str, str]:
    """(weights file, format) for a checkpoint directory, a .safetensors file or an official .pth/.pt/.ckpt.

    A trainer run directory (or its ``checkpoints/`` folder) resolves to its newest complete checkpoint.
    """
    if os.path.isdir(ckpt):
        for root in (os.path.join(ckpt, "checkpoints"), ckpt):
            if not os.path.isfile(os.path.join(ckpt, "ema.safetensors")) and os.path.isdir(root):
                latest = _latest_complete(root)
                if latest is not None:
                    dist.print0(f"[eval] {ckpt}: using the newest complete checkpoint {latest}")
                    ckpt = latest
                    break
        path = os.path.join(ckpt, "ema.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint directory {ckpt!r} has no ema.safetensors (expected the trainer's "
                                    "consolidated EMA weights; is the checkpoint complete?)")
        if os.path.isfile(os.path.join(ckpt, "meta.json")) and not os.path.isfile(os.path.join(ckpt, COMPLETE_MARKER)):
            raise ValueError(f"checkpoint directory {ckpt!r} has no {COMPLETE_MARKER} marker: the trainer did not "
                             "finish writing it")
        return path, "safetensors"
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt!r}")
    if ckpt.endswith(".safetensors"):
        return ckpt, "safetensors"
    if ckpt.endswith((".pth", ".pt", ".ckpt")):
        return ckpt, "official"
    raise ValueError(f"checkpoint {ckpt!r}: expected a directory, a .safetensors file or an official .pth/.pt/.ckpt")


def load_eval_model(cfg: ModelLoadConfig, device) -> LoadedModel:
    """Build the registered model named by the checkpoint's metadata (or cfg.name) and load its weights."""
    from modeling import build_model
    from modeling.convert import build_from_official

    path, fmt = resolve_checkpoint(cfg.ckpt)
    if fmt == "safetensors":
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        name = cfg.name or meta.get("model")
        if not name:
            raise ValueError(f"{path}: no 'model' entry in the safetensors metadata; set model.name=<registry name>")
        overrides = {**json.loads(meta.get("model_overrides", "{}")), **dict(cfg.overrides)}
        model = build_model(name, device="meta", **overrides)
        model.to_empty(device="cpu")
        model.init_weights()  # buffers that are not in the state dict get their real values
        sd = load_file(path)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{path}: weights do not fit {name} {overrides}: {e}") from None
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit {name} {overrides}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
    else:
        if not cfg.name:
            raise ValueError(f"{path}: an official checkpoint carries no model name; set model.name (e.g. FlowDCN-XL/2)")
        name, overrides = cfg.name, dict(cfg.overrides)
        model = build_from_official(path, name, which=cfg.which, **overrides)
        overrides = {"rounding": "trunc", **overrides}
    model = model.eval().requires_grad_(False).to(device)
    return LoadedModel(model, name, overrides, os.path.abspath(path), file_sha256(path), fmt)


# ----------------------------------------------------------------------------- the sample set
def class_labels(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label of sample i = i mod num_classes: exact balance for N a multiple of num_classes."""
    return indices.long() % num_classes


def build_velocity_fn(model, s: SamplingConfig):
    """model -> fn(x, t, y): S_max policy for the target grid, then classifier-free guidance."""
    from modeling import FlowDCN
    from modeling.guidance import cfg_wrapper
    from modeling.smax import build_smax_policy, with_smax_policy

    policy = build_smax_policy(s.smax_policy, train_grid=tuple(s.smax_train_grid))
    if policy is not None and not isinstance(model, FlowDCN):
        raise ValueError(f"sampling.smax_policy={s.smax_policy!r} applies to FlowDCN models only, not {type(model).__name__}")
    fn = with_smax_policy(model, policy)
    interval = tuple(s.guidance_interval) if s.guidance_interval else None
    if interval is not None and len(interval) != 2:
        raise ValueError(f"sampling.guidance_interval must be [lo, hi], got {s.guidance_interval}")
    return cfg_wrapper(fn, s.cfg_scale, null_class=model.cfg.num_classes, interval=interval)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 with round-half-up (ADM/DiT: clamp(127.5·x + 128, 0, 255))."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- chunk files
class ChunkStore:
    """Chunk c holds samples [c·chunk_size, min(N, (c+1)·chunk_size)) in ``<root>/chunk_{c:06d}.safetensors``."""

    def __init__(self, root: str, fingerprint: dict, num_samples: int, chunk_size: int):
        if chunk_size < 1 or num_samples < 1:
            raise ValueError(f"num_samples ({num_samples}) and chunk_size ({chunk_size}) must be positive")
        self.root, self.num_samples, self.chunk_size = root, num_samples, chunk_size
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.n_chunks = -(-num_samples // chunk_size)

    def indices(self, c: int) -> torch.Tensor:
        """Global sample indices of chunk c."""
        return torch.arange(c * self.chunk_size, min(self.num_samples, (c + 1) * self.chunk_size))

    def path(self, c: int) -> str:
        """The final file name of chunk c."""
        return os.path.join(self.root, f"chunk_{c:06d}.safetensors")

    def done(self, c: int) -> bool:
        """A chunk counts as finished iff its final file exists (it is only ever renamed into place complete)."""
        return os.path.isfile(self.path(c))

    def save(self, c: int, tensors: dict) -> None:
        """Write chunk c atomically: temp file in the same directory, fsync, os.replace."""
        os.makedirs(self.root, exist_ok=True)
        path = self.path(c)
        tmp = f"{path}.tmp.{os.getpid()}"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": CHUNK_FORMAT, "fingerprint": self.fingerprint, "chunk": str(c)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, c: int, keys: Optional[list] = None) -> dict:
        """Read chunk c, refusing a file written by a different evaluation or for other indices."""
        path = self.path(c)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHUNK_FORMAT:
                raise ValueError(f"{path}: not an evaluation chunk file (format {meta.get('format')!r})")
            if meta.get("fingerprint") != self.fingerprint:
                theirs, ours = json.loads(meta.get("fingerprint", "{}")), json.loads(self.fingerprint)
                diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
                raise ValueError(f"{path}: written by a different evaluation (differs in {diff}); delete "
                                 f"{self.root} or choose another out_dir/run_name")
            out = {k: f.get_tensor(k) for k in (keys or f.keys())}
            idx = f.get_tensor("indices")
        if not torch.equal(idx, self.indices(c)):
            raise ValueError(f"{path}: holds indices {int(idx[0])}..{int(idx[-1])} ({len(idx)}), expected chunk {c} of "
                             f"{self.num_samples} samples in chunks of {self.chunk_size}; delete it to regenerate")
        return out


# ----------------------------------------------------------------------------- generation
@dataclass
class SamplingResult:
    """All-reduced statistics of every sample of one resolution."""

    pool: FeatureStats
    spatial: Optional[FeatureStats]
    inception: ISStats
    chunks_generated: int             # by all ranks in this run (the rest were already on disk)
    seconds: float


class ChunkSampler:
    """Generates the samples and features of one chunk: noise -> solver -> VAE decode -> uint8 -> extractor."""

    def __init__(self, velocity_fn, vae, extractor, grid: tuple[int, int], channels: int, num_classes: int,
                 s: SamplingConfig, m: MetricsConfig, device, keep_images_below: int = 0):
        from modeling.samplers import SamplerConfig

        self.fn, self.vae, self.extractor = velocity_fn, vae, extractor
        self.grid, self.channels, self.num_classes = grid, channels, num_classes
        self.s, self.m, self.device = s, m, device
        self.keep_images_below = keep_images_below        # store uint8 images of indices below this
        self.solver = SamplerConfig(solver=s.solver, steps=s.steps, last_step=s.last_step,
                                    diffusion_scale=s.diffusion_scale, ab_bootstrap=s.ab_bootstrap,
                                    rtol=s.rtol, atol=s.atol)
        if s.dtype not in ("fp32", "bf16"):
            raise ValueError(f"sampling.dtype={s.dtype!r}: expected fp32 or bf16")

    @torch.no_grad()
    def latents(self, idx: torch.Tensor) -> torch.Tensor:
        """Solve the flow ODE/SDE from the (seed, i) noise of samples ``idx`` -> latents [n, C, h, w] fp32."""
        from modeling.samplers import StepNoise, noise_for_indices, sample

        y = class_labels(idx, self.num_classes).to(self.device)
        x = noise_for_indices(idx.tolist(), (self.channels, *self.grid), self.s.seed, device=self.device)
        noise = StepNoise(idx.tolist(), self.s.seed) if self.s.solver == "euler_maruyama" else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.dtype == "bf16"):
            z = sample(self.fn, x, y, self.solver, noise=noise)
        return z.float()

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor) -> dict:
        """Chunk tensors: indices, labels, pool, spatial, logits (+ images uint8 [n,H,W,3] where kept)."""
        parts: dict = {"pool": [], "spatial": [], "logits": [], "images": []}
        bs = self.s.batch_size
        for b in range(0, len(idx), bs):
            sub = idx[b:b + bs]
            z = self.latents(sub)                                                         # (n, C, h, w)
            u8 = torch.cat([to_uint8(self.vae.decode(z[d:d + self.s.decode_batch_size]))
                            for d in range(0, len(z), self.s.decode_batch_size)])         # (n, 3, H, W)
            for e in range(0, len(sub), self.m.batch_size):
                feats = self.extractor(u8[e:e + self.m.batch_size].to(self.device))
                for k in ("pool", "spatial", "logits"):
                    parts[k].append(feats[k].float().cpu())
            keep = int((sub < self.keep_images_below).sum())
            if keep:
                parts["images"].append(u8[:keep].permute(0, 2, 3, 1).cpu())              # (n, H, W, 3)
        out = {k: torch.cat(v) for k, v in parts.items() if v}
        out["indices"] = idx.clone()
        out["labels"] = class_labels(idx, self.num_classes)
        return out


def _accumulate(t: dict, pool: FeatureStats, spatial: Optional[FeatureStats], isstats: ISStats) -> None:
    """Add one chunk's features to the float64 accumulators."""
    pool.update(t["pool"])
    if spatial is not None:
        spatial.update(t["spatial"])
    isstats.update(t["logits"], t["indices"])


def run_sampling(sampler: ChunkSampler, store: ChunkStore, dims: dict, m: MetricsConfig, device,
                 desc: str = "", progress: bool = True, stop_after_chunks: Optional[int] = None) -> SamplingResult:
    """Generate every missing chunk (rank-strided), then all-reduce float64 statistics over all chunks.

    Chunks already on disk are read back (each by one rank); chunks made now are counted from memory.
    ``stop_after_chunks`` (tests only) makes each rank stop after that many new chunks, like a killed job.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    missing = [c for c in range(store.n_chunks) if not store.done(c)]
    dist.barrier()  # every rank has listed the same missing chunks before any rank writes one
    missing_set = set(missing)
    existing = [c for c in range(store.n_chunks) if c not in missing_set]
    pool = FeatureStats(dims["pool"], device)
    spatial = FeatureStats(dims["spatial"], device) if m.sfid else None
    isstats = ISStats(dims["logits"], store.num_samples, m.is_splits, device)
    for c in existing[rank::world]:
        _accumulate(store.load(c, ["indices", "pool", "spatial", "logits"]), pool, spatial, isstats)
    mine = missing[rank::world]
    if stop_after_chunks is not None:
        mine = mine[:stop_after_chunks]
    bar = None
    if progress and rank == 0 and mine:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(store.indices(c)) for c in mine), unit="img", desc=f"{desc} rank 0/{world}",
                   dynamic_ncols=True)
    for c in mine:
        t = sampler(store.indices(c))
        store.save(c, t)
        _accumulate(t, pool, spatial, isstats)
        if bar is not None:
            bar.update(len(t["indices"]))
    if bar is not None:
        bar.close()
    dist.barrier()
    if stop_after_chunks is not None:
        raise InterruptedError(f"stopped after {stop_after_chunks} new chunk(s) per rank (test hook)")
    absent = [store.path(c) for c in range(store.n_chunks) if not store.done(c)]
    if absent:
        raise RuntimeError(f"{len(absent)} chunk file(s) missing after sampling, e.g. {absent[:3]}: is {store.root} "
                           "on a filesystem shared by all ranks?")
    comm = dist.comm_device(torch.device(device))
    pool.all_reduce(comm)
    if spatial is not None:
        spatial.all_reduce(comm)
    isstats.all_reduce(comm)
    if int(pool.n) != store.num_samples:
        raise RuntimeError(f"statistics cover {int(pool.n)} samples, expected {store.num_samples}")
    return SamplingResult(pool, spatial, isstats, len(missing), time.time() - t0)


def pool_features(store: ChunkStore, limit: Optional[int] = None) -> torch.Tensor:
    """Pool features of samples [0, limit) in index order, read from the chunk files (precision/recall)."""
    limit = store.num_samples if limit is None else min(limit, store.num_samples)
    out = []
    for c in range(store.n_chunks):
        if c * store.chunk_size >= limit:
            break
        out.append(store.load(c, ["pool"])["pool"])
    return torch.cat(out)[:limit]


def stored_images(store: ChunkStore, limit: Optional[int] = None):
    """Yield (indices, uint8 images [n,H,W,3]) in index order from chunk files that kept images."""
    limit = store.num_samples if limit is None else min(limit, store.num_samples)
    for c in range(store.n_chunks):
        if c * store.chunk_size >= limit:
            break
        t = store.load(c)
        if "images" not in t:
            raise ValueError(f"{store.path(c)}: holds no images (written with save_npz=false / a smaller grid_size); "
                             "delete the chunk files to regenerate them with images")
        n = min(len(t["images"]), limit - c * store.chunk_size)
        yield t["indices"][:n], t["images"][:n]


def sampling_fingerprint(loaded: LoadedModel, vae_id: str, resolution, s: SamplingConfig, extractor_name: str,
                         keep_images_below: int, fp32_gpu_convs: bool = False) -> dict:
    """Everything that determines a chunk's content; chunk files from another fingerprint are refused.

    ``fp32_gpu_convs``: GPU convolutions with TF32 off (``tf32=false``); recorded only then, so the fingerprints of
    default runs stay as they were."""
    sd = asdict(s)
    sd.pop("num_samples")  # a longer run may reuse the chunks of a shorter one (indices are checked per chunk)
    fp = {"ckpt_sha256": loaded.sha256, "model": loaded.name, "overrides": loaded.overrides, "vae": vae_id,
          "resolution": list(resolution), "sampling": sd, "extractor": extractor_name,
          "images_below": keep_images_below}
    if fp32_gpu_convs:
        fp["gpu_convs"] = "fp32"
    return fp
