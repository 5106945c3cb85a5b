"""Reference statistics from an ADM-style .npz, an image folder and tar files, and their cache."""
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import evaluation.reference as reference
from evaluation.config import ReferenceConfig
from evaluation.inception import TinyExtractor

EXT = TinyExtractor()
DIMS = TinyExtractor.dims


def direct_stats(imgs: np.ndarray) -> dict:
    """Independent path: one extractor call on all images, numpy mean / unbiased covariance in float64."""
    f = EXT(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    pool, sp = f["pool"].double().numpy(), f["spatial"].double().numpy()
    return {"mu": pool.mean(0), "sigma": np.cov(pool, rowvar=False), "mu_s": sp.mean(0),
            "sigma_s": np.cov(sp, rowvar=False), "pool": f["pool"].numpy()}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(9, 24, 24, 3)).astype(np.uint8)


def check(got: dict, want: dict, pr_n: int):
    # Features come from float32 convs run in other batch sizes: agreement to float32 round-off.
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got["pr_features"].numpy(), want["pool"][:pr_n], rtol=1e-5, atol=1e-6)


def test_npz_images_and_precomputed_stats(images, tmp_path):
    path = str(tmp_path / "ref.npz")
    np.savez(path, arr_0=images)
    r = reference.load_reference(ReferenceConfig(npz=path, pr_max_images=5), EXT, DIMS, "cpu", str(tmp_path / "c"),
                                 batch_size=4)
    check(r, direct_stats(images), 5)
    # Precomputed (TF) statistics in the npz are used as they are; arr_0 still feeds precision/recall.
    mu, sigma = np.arange(16.0), np.eye(16) * 2
    np.savez(path, arr_0=images, mu=mu, sigma=sigma)
    r = reference.load_reference(ReferenceConfig(npz=path), EXT, DIMS, "cpu", str(tmp_path / "c"))
    np.testing.assert_array_equal(r["mu"].numpy(), mu)
    np.testing.assert_array_equal(r["sigma"].numpy(), sigma)
    assert r["pr_features"].shape == (9, 16) and "npz" in r["stats_from"]
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d"):
        reference.load_reference(ReferenceConfig(npz=path), EXT, DIMS, "cpu", str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match="reference.npz"):
        reference.load_reference(ReferenceConfig(npz=str(tmp_path / "missing.npz")), EXT, DIMS, "cpu", str(tmp_path))


def test_folder_and_tar_sources_and_cache(images, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    names = [f"sub/{i:02d}.png" if i % 2 else f"{i:02d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        Image.fromarray(img).save(folder / name)
    order = np.argsort([str(folder / n) for n in names])      # sources are read in sorted path order
    cfg = ReferenceConfig(images=str(folder), resolution=[24, 24], pr_max_images=4)
    cache = str(tmp_path / "cache")
    r = reference.load_reference(cfg, EXT, DIMS, "cpu", cache, batch_size=4)
    check(r, direct_stats(images[order]), 4)
    assert len(os.listdir(cache)) == 1
    # Second call: read from the cache, nothing recomputed.
    monkeypatch.setattr(reference, "_features", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    r2 = reference.load_reference(cfg, EXT, DIMS, "cpu", cache)
    torch.testing.assert_close(r2["sigma"], r["sigma"], rtol=0, atol=0)
    monkeypatch.undo()
    # The same images in a tar give the same statistics.
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for n in sorted(names):
            tf.add(folder / n, arcname=n)
    tar_order = np.argsort(names)
    r3 = reference.load_reference(ReferenceConfig(images=str(tar), resolution=[24, 24], pr_max_images=4), EXT, DIMS,
                                  "cpu", cache, batch_size=4)
    check(r3, direct_stats(images[tar_order]), 4)
    with pytest.raises(FileNotFoundError, match="no images"):
        (tmp_path / "empty").mkdir()
        reference.load_reference(ReferenceConfig(images=str(tmp_path / "empty")), EXT, DIMS, "cpu", cache)


def test_cover_crop_shapes():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 451, 3)).astype(np.uint8))
    assert reference._cover_crop(img, 64, 64).shape == (64, 64, 3)
    assert reference._cover_crop(img, 56, 112).shape == (56, 112, 3)
    assert reference._cover_crop(img, 120, 40).shape == (120, 40, 3)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_rows_read_single_images(save, images, tmp_path):
    path = str(tmp_path / "a.npz")
    save(path, arr_0=images, other=np.zeros(3))
    rows = reference.NpzRows(path, "arr_0")
    assert rows.shape == images.shape and rows.dtype == np.uint8 and len(rows) == len(images)
    for i in (4, 0, 8, 4):
        np.testing.assert_array_equal(rows[i], images[i])
