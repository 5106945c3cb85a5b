"""LatentVAE over a tiny random AutoencoderKL: moments match diffusers directly, decode divides by the scale."""
import os

import pytest
import torch

from data_pipeline.vae import IdentityVAE, LatentVAE


def test_moments_and_decode_match_diffusers(tiny_vae_dir):
    from diffusers import AutoencoderKL

    vae = LatentVAE.from_pretrained(tiny_vae_dir)
    ref = AutoencoderKL.from_pretrained(tiny_vae_dir, local_files_only=True).double().eval()
    assert vae.scale_factor == pytest.approx(0.18215) and vae.downsample == 8 and vae.vae_id
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    mean, logvar = vae.encode_moments(x)
    assert mean.shape == (2, 4, 4, 6) and logvar.shape == (2, 4, 4, 6)
    with torch.no_grad():
        d = ref.encode(x.double()).latent_dist
    torch.testing.assert_close(mean.double(), d.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logvar.double(), d.logvar, rtol=1e-4, atol=1e-4)
    z = mean * vae.scale_factor
    z_before = z.clone()
    img = vae.decode(z)
    assert torch.equal(z, z_before)  # no in-place scaling of the caller's tensor
    with torch.no_grad():
        want = ref.decode(mean.double()).sample.clamp(-1, 1)
    torch.testing.assert_close(img.double(), want, rtol=1e-4, atol=1e-4)


def test_bf16_encode_close_to_fp32(tiny_vae_dir):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    m32, _ = LatentVAE.from_pretrained(tiny_vae_dir).encode_moments(x)
    m16, _ = LatentVAE.from_pretrained(tiny_vae_dir, dtype=torch.bfloat16).encode_moments(x)
    assert m16.dtype == torch.float32
    assert (m16 - m32).abs().max() < 0.05 * m32.abs().max() + 1e-3


def test_missing_dir_and_weights_named(tmp_path, tiny_vae_dir):
    with pytest.raises(FileNotFoundError, match="nope"):
        LatentVAE.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text(open(os.path.join(tiny_vae_dir, "config.json")).read())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        LatentVAE.from_pretrained(str(tmp_path / "cfgonly"))
    with pytest.raises(ValueError, match="multiple"):
        LatentVAE.from_pretrained(tiny_vae_dir).encode_moments(torch.zeros(1, 3, 12, 16))


def test_identity_round_trip():
    vae = IdentityVAE(scale_factor=0.5)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    mean, logvar = vae.encode_moments(x)
    assert torch.equal(mean, x) and (logvar == -30).all()
    torch.testing.assert_close(vae.decode(mean * 0.5), x)
