"""Fixtures for data_pipeline tests: a tiny random x8 AutoencoderKL on disk and real photos of several aspect ratios."""
import pytest
import torch

from data_pipeline.tiny import make_tiny_vae
from dp_helpers import encode_args


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convs on a shared 2-core box run ~30x faster on one thread (no OpenMP spinning against other jobs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    return make_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


@pytest.fixture(scope="session")
def latent_data(tmp_path_factory, tiny_vae_dir):
    """48 real-photo crops in 3 classes encoded by the tiny VAE into both formats: {"imgs", "wds", "mds"} dirs."""
    from data_pipeline.encode import main
    from data_pipeline.tiny import write_crops

    root = tmp_path_factory.mktemp("latent_data")
    imgs = write_crops(str(root / "imgs"), n=48, num_classes=3)
    out = {"imgs": imgs}
    for fmt in ("wds", "mds"):
        out[fmt] = str(root / fmt)
        assert main(encode_args(imgs, out[fmt], tiny_vae_dir, fmt)) == 0
    return out
