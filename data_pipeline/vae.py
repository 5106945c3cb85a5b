"""VAE wrappers: image <-> latent moments, behind one small interface used by encoding and evaluation.

Latents in *model space* are ``posterior_sample * scale_factor`` (0.18215 for the SD VAEs). ``encode_moments``
returns raw posterior moments (mean, logvar) so the loader can draw a fresh sample each epoch;
``decode`` takes model-space latents and divides by ``scale_factor`` itself.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

SD_SCALE_FACTOR = 0.18215
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors",)


class LatentVAE:
    """diffusers ``AutoencoderKL`` loaded from a local directory (sd-vae-ft-ema / sd-vae-ft-mse layout)."""

    def __init__(self, vae, vae_id: str, scale_factor: float | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.vae_id = vae_id
        cfg_scale = getattr(vae.config, "scaling_factor", None)
        self.scale_factor = float(scale_factor if scale_factor is not None else (cfg_scale or SD_SCALE_FACTOR))
        self.latent_channels = int(vae.config.latent_channels)
        # Each down block but the last halves the resolution (SD VAE: 4 blocks -> x8).
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @classmethod
    def from_pretrained(cls, local_dir: str, dtype: torch.dtype = torch.float32, device="cpu",
                        scale_factor: float | None = None, vae_id: str | None = None) -> "LatentVAE":
        """Load from ``local_dir`` (config.json + diffusion_pytorch_model.safetensors); never downloads."""
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"VAE directory not found: {local_dir!r} (expected the sd-vae-ft-ema/mse "
                                    "layout: config.json + diffusion_pytorch_model.safetensors)")
        cfg = os.path.join(local_dir, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"VAE config missing: {cfg!r}")
        if not any(os.path.isfile(os.path.join(local_dir, f)) for f in _WEIGHT_FILES):
            raise FileNotFoundError(f"VAE weights missing in {local_dir!r}: expected one of {list(_WEIGHT_FILES)} "
                                    "(only safetensors weights are loaded; convert a .bin with safetensors first)")
        from diffusers import AutoencoderKL  # heavy import, only when a real VAE is used

        vae = AutoencoderKL.from_pretrained(local_dir, local_files_only=True, use_safetensors=True,
                                            torch_dtype=dtype)
        vae = vae.to(device)
        return cls(vae, vae_id=vae_id or os.path.basename(os.path.normpath(local_dir)), scale_factor=scale_factor)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] ``[N,3,H,W]`` -> posterior (mean, logvar), each fp32 ``[N,C,H/ds,W/ds]``."""
        _check_images(images, self.downsample)
        x = images.to(device=self.device, dtype=self.dtype)
        moments = self.vae.encode(x).latent_dist  # DiagonalGaussianDistribution; logvar clamped to [-30, 20]
        return moments.mean.float(), moments.logvar.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (already x scale_factor) ``[N,C,h,w]`` -> images in [-1, 1] ``[N,3,h*ds,w*ds]``."""
        z = latents.to(device=self.device, dtype=self.dtype) / self.scale_factor  # not in place: caller's tensor
        return self.vae.decode(z).sample.float().clamp(-1, 1)


class IdentityVAE:
    """Pixel-space stand-in with the LatentVAE interface: mean = pixels, logvar = -30 (no noise to speak of)."""

    LOGVAR = -30.0  # the floor diffusers clamps to; exp(-15) ~ 3e-7, and it fits in fp16

    def __init__(self, channels: int = 3, scale_factor: float = 1.0, vae_id: str = "identity"):
        self.vae_id = vae_id
        self.scale_factor = float(scale_factor)
        self.latent_channels = channels
        self.downsample = 1
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] ``[N,C,H,W]`` -> (images, constant logvar), fp32."""
        _check_images(images, 1, channels=self.latent_channels)
        mean = images.float().clone()
        return mean, torch.full_like(mean, self.LOGVAR)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1] (divides by scale_factor)."""
        return (latents.float() / self.scale_factor).clamp(-1, 1)


def build_vae(name_or_dir: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """``"identity"`` -> IdentityVAE, anything else -> LatentVAE.from_pretrained(dir)."""
    if name_or_dir == "identity":
        return IdentityVAE()
    return LatentVAE.from_pretrained(name_or_dir, dtype=dtype, device=device)


def _check_images(images: torch.Tensor, downsample: int, channels: int = 3) -> None:
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"images must be [N,{channels},H,W], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} is not a multiple of the VAE downsampling factor {downsample}")
