"""Typed configuration of an evaluation job (the Hydra YAML in configs/eval/ fills these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ModelLoadConfig:
    """Which weights to evaluate and how to build the network around them."""

    ckpt: str = "???"                     # checkpoint dir (holds ema.safetensors) | .safetensors | official .pth/.pt
    name: Optional[str] = None            # registry name; required for an official .pth, else read from metadata
    overrides: Dict[str, Any] = field(default_factory=dict)   # build_model overrides on top of the metadata's
    which: str = "ema"                    # official .pth only: "ema" | "raw"


@dataclass
class SamplingConfig:
    """The sampler, guidance and sample set (sample i's label and noise depend only on (seed, i))."""

    solver: str = "euler_maruyama"        # euler | heun | euler_maruyama | ab2 | ab3 | ab4 | dopri5
    steps: int = 250
    last_step: Optional[float] = 0.04     # length of the final interval (None: uniform grid)
    diffusion_scale: float = 1.0          # SDE diffusion w(t) = scale·(1−t)
    ab_bootstrap: str = "rk"              # Adams–Bashforth warm-up: rk | lower_order
    rtol: float = 1e-4                    # dopri5
    atol: float = 1e-4
    cfg_scale: float = 1.0                # 1.0 = no guidance
    guidance_interval: Optional[List[float]] = None   # [lo, hi] in t: guide only there
    smax_policy: str = "none"             # none | official | constant (arbitrary-resolution S_max)
    smax_train_grid: List[int] = field(default_factory=lambda: [16, 16])   # (h, w) tokens at training resolution
    num_samples: int = 50_000             # class-balanced: label of sample i = i mod num_classes
    seed: int = 0
    batch_size: int = 64                  # images per forward (CFG doubles it internally)
    decode_batch_size: int = 32           # images per VAE decode (the SD decoder needs ~1 GB per 512² image)
    chunk_size: int = 1000                # samples per resumable chunk file (fixed: independent of world size)
    dtype: str = "fp32"                   # fp32 | bf16 (autocast of the model forward; latents stay fp32)


@dataclass
class MetricsConfig:
    """Feature extractor and metric knobs."""

    extractor: str = "inception"          # inception (needs inception_weights) | tiny (tests/smoke: not FID)
    inception_weights: Optional[str] = None   # local pt_inception-2015-12-05-6726825d.pth
    batch_size: int = 100                 # images per Inception forward
    is_splits: int = 10
    pr_k: int = 3
    pr_max_samples: Optional[int] = None  # precision/recall on the first N samples (None: all)
    sfid: bool = True


@dataclass
class ReferenceConfig:
    """Real-image statistics: an ADM reference batch .npz, or a folder/tar of images (statistics cached)."""

    npz: Optional[str] = None             # e.g. VIRTUAL_imagenet256_labeled.npz (mu, sigma, mu_s, sigma_s, arr_0)
    use_npz_stats: bool = True            # use the npz's precomputed mu/sigma (ADM/TF numbers) when present
    images: Optional[str] = None          # folder (recursive) or .tar file(s) (comma-separated / glob) of real images
    resolution: Optional[List[int]] = None    # (h, w) to crop/resize real images to; None: 256x256 (ADM)
    max_images: Optional[int] = None      # first N images in sorted order (None: all)
    pr_max_images: int = 10_000           # reference features kept for precision/recall
    cache_dir: Optional[str] = None       # where computed statistics are cached (default <out_dir>/ref_cache)


@dataclass
class WandbConfig:
    """Optional wandb logging (offline unless configured otherwise)."""

    enabled: bool = False
    project: str = "flowdcn-eval"
    mode: str = "offline"
    name: Optional[str] = None


@dataclass
class EvalConfig:
    """One evaluation job: a checkpoint, sampler, resolutions, sample count and reference."""

    model: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    vae: str = "???"                      # local AutoencoderKL directory, or "identity" (pixel-space models)
    resolutions: List[List[int]] = field(default_factory=lambda: [[256, 256]])   # (h, w) in pixels
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    out_dir: str = "runs/eval"
    run_name: Optional[str] = None        # default: derived from checkpoint and sampler
    save_npz: bool = False                # also write ADM-compatible samples.npz (uint8 arr_0 + labels)
    grid_size: int = 64                   # samples in grid.png (the first N indices)
    device: str = "auto"                  # auto | cpu | cuda
    tf32: bool = True                     # GPU convolutions (VAE, Inception) in TF32, PyTorch's and ADM's TF default; false: fp32
    wandb: WandbConfig = field(default_factory=WandbConfig)
