"""Reference (real-image) statistics: from an ADM reference batch .npz or from images, cached on disk.

An ADM reference batch (e.g. ``VIRTUAL_imagenet256_labeled.npz``) holds ``mu, sigma`` (pool_3),
``mu_s, sigma_s`` (mixed_6/conv) computed by the TF evaluator, and ``arr_0``: uint8 NHWC images
(10K for ImageNet). With ``use_npz_stats`` the precomputed TF statistics are used as they are
(comparable with published numbers); ``arr_0`` always goes through our extractor for the
precision/recall features, and for the statistics when the npz has none.
Images from a folder or tar files are ADM-center-cropped (square) or cover-resized and
center-cropped (other aspect ratios) to the reference resolution.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from typing import Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import dist
from .config import ReferenceConfig
from .stats import FeatureStats

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".jpe")


# ----------------------------------------------------------------------------- image sources
def _cover_crop(img, h: int, w: int):
    """Square: ADM center crop. Otherwise: BOX-halve, BICUBIC-resize to cover (h, w), center crop."""
    from PIL import Image

    from data_pipeline.preprocess import center_crop_arr

    img = img.convert("RGB")
    if h == w:
        return np.asarray(center_crop_arr(img, h))
    while img.size[0] >= 2 * w and img.size[1] >= 2 * h:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = max(w / img.size[0], h / img.size[1])
    nw, nh = max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))
    arr = np.asarray(img.resize((nw, nh), resample=Image.BICUBIC))
    top, left = (nh - h) // 2, (nw - w) // 2
    return arr[top:top + h, left:left + w]


def list_images(spec: str) -> list[tuple[str, str]]:
    """(container, member) pairs in a stable order: a folder (recursive), or .tar file(s) (comma list / glob)."""
    if os.path.isdir(spec):
        out = []
        for root, _, files in os.walk(spec):
            out += [(os.path.join(root, f), "") for f in files if f.lower().endswith(IMAGE_EXTS)]
        items = sorted(out)
    else:
        tars = sorted(p for part in spec.split(",") for p in (glob.glob(part) or [part]))
        items = []
        for t in tars:
            if not os.path.isfile(t) or not tarfile.is_tarfile(t):
                raise FileNotFoundError(f"reference.images: {t!r} is neither a folder nor a tar file")
            with tarfile.open(t) as tf:
                items += sorted((t, m.name) for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_EXTS))
    if not items:
        raise FileNotFoundError(f"reference.images={spec!r}: no images ({', '.join(IMAGE_EXTS)}) found")
    return items


def _read_image(container: str, member: str):
    """A PIL image from a file (member "") or a tar member; a corrupt one is an error naming it."""
    from PIL import Image

    try:
        if not member:
            return Image.open(container)
        with tarfile.open(container) as tf:
            return Image.open(io.BytesIO(tf.extractfile(member).read()))
    except Exception as e:  # a corrupt file must name itself before the job has done hours of work
        raise ValueError(f"cannot read reference image {container}{'::' + member if member else ''}: {e}") from None


class NpzRows:
    """Row access to one array of an .npz without loading it whole (each rank reads only its own images).

    np.savez stores members uncompressed, so a row is one seek + read; compressed members still work
    (zipfile then decompresses up to the row), only slower.
    """

    def __init__(self, path: str, key: str):
        import zipfile

        self.path, self.member = path, key + ".npy"
        with zipfile.ZipFile(path) as zf, zf.open(self.member) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: {key} is Fortran-ordered; re-save it C-ordered")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._zf = self._f = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        import zipfile

        if self._f is None:
            self._zf = zipfile.ZipFile(self.path)
            self._f = self._zf.open(self.member)
        self._f.seek(self.offset + int(i) * self.row_bytes)
        buf = self._f.read(self.row_bytes)
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:])


# ----------------------------------------------------------------------------- features of real images
def _features(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], extractor, dims: dict, device, pr_max: int,
              sfid: bool) -> dict:
    """Stats (all-reduced) and the first ``pr_max`` pool features (gathered, index order) of uint8 batches."""
    pool = FeatureStats(dims["pool"], device)
    spatial = FeatureStats(dims["spatial"], device) if sfid else None
    keep_idx, keep = [], []
    for idx, u8 in batches:                                                        # u8: (n, 3, H, W)
        f = extractor(u8.to(device))
        pool.update(f["pool"])
        if spatial is not None:
            spatial.update(f["spatial"])
        sel = idx < pr_max
        if sel.any():
            keep_idx.append(idx[sel])
            keep.append(f["pool"][sel.to(f["pool"].device)].float().cpu())
    comm = dist.comm_device(torch.device(device))
    pool.all_reduce(comm)
    if spatial is not None:
        spatial.all_reduce(comm)
    part = (torch.cat(keep_idx), torch.cat(keep)) if keep else (torch.zeros(0, dtype=torch.long), torch.zeros(0, dims["pool"]))
    if dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        torch.distributed.all_gather_object(parts, part)
    else:
        parts = [part]
    idx = torch.cat([p[0] for p in parts])
    feats = torch.cat([p[1] for p in parts])[idx.argsort()]
    out = {"pr_features": feats, "count": torch.tensor(int(pool.n))}
    out["mu"], out["sigma"] = pool.mean_cov()
    if spatial is not None:
        out["mu_s"], out["sigma_s"] = spatial.mean_cov()
    return out


def _batched(n: int, batch: int, load) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's strided share of items [0, n) in batches: (indices, uint8 [b,3,H,W])."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, n, world))
    for b in range(0, len(mine), batch):
        idx = torch.tensor(mine[b:b + batch])
        yield idx, torch.from_numpy(np.stack([load(int(i)) for i in idx])).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- cache
def _cache_path(cache_dir: str, key: dict) -> str:
    """Cache file named by a hash of everything the statistics depend on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"ref_{digest}.safetensors")


def _cached(path: str, key: dict, compute) -> dict:
    """Load the cache file if it exists (and matches ``key``), else compute on all ranks and write on rank 0."""
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "{}"))
        if stored != key:
            raise ValueError(f"{path}: reference cache for a different source ({stored}); delete it")
        return load_file(path)
    out = compute()
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dist.barrier()
    return out


# ----------------------------------------------------------------------------- public entry
def load_reference(r: ReferenceConfig, extractor, dims: dict, device, cache_dir: str, sfid: bool = True,
                   batch_size: int = 100) -> Optional[dict]:
    """{"mu", "sigma", ["mu_s", "sigma_s"], ["pr_features"], "source"} or None when no reference is configured."""
    if r.npz and r.images:
        raise ValueError("set only one of reference.npz and reference.images")
    if not r.npz and not r.images:
        return None
    ext_name = getattr(extractor, "name", type(extractor).__name__)
    if r.npz:
        if not os.path.isfile(r.npz):
            raise FileNotFoundError(f"reference.npz not found: {r.npz!r} (e.g. VIRTUAL_imagenet256_labeled.npz)")
        with np.load(r.npz) as z:
            keys = set(z.files)
            pre = {k: torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in ("mu", "sigma", "mu_s", "sigma_s")
                   if k in keys} if r.use_npz_stats else {}
            n_img = int(z["arr_0"].shape[0]) if "arr_0" in keys else 0
        if "mu" in pre and pre["mu"].numel() != dims["pool"]:
            raise ValueError(f"{r.npz}: mu is {pre['mu'].numel()}-d but the extractor's pool features are "
                             f"{dims['pool']}-d (use the Inception extractor, or use_npz_stats=false)")
        if "mu_s" in pre and pre["mu_s"].numel() != dims["spatial"]:
            raise ValueError(f"{r.npz}: mu_s is {pre['mu_s'].numel()}-d, the extractor's spatial features are "
                             f"{dims['spatial']}-d")
        out = {"source": f"npz:{os.path.abspath(r.npz)}"}
        if n_img:
            key = {"npz_sha256": _sha256(r.npz), "extractor": ext_name, "pr_max": r.pr_max_images, "sfid": sfid}
            arr = NpzRows(r.npz, "arr_0")
            if arr.dtype != np.uint8 or len(arr.shape) != 4 or arr.shape[-1] != 3:
                raise ValueError(f"{r.npz}: arr_0 must be uint8 [N,H,W,3], got {arr.dtype} {arr.shape}")
            comp = _cached(_cache_path(cache_dir, key), key, lambda: _features(
                _batched(n_img, batch_size, lambda i: arr[i]), extractor, dims, device, r.pr_max_images, sfid))
            out.update(comp)  # the precomputed TF statistics (pre) override these below
        elif "mu" not in pre:
            raise ValueError(f"{r.npz}: has neither precomputed mu/sigma nor images arr_0")
        out.update(pre)
        out["stats_from"] = "npz (precomputed TF statistics)" if "mu" in pre else f"arr_0 via {ext_name}"
        return out
    h, w = r.resolution or (256, 256)
    items = list_images(r.images)
    if r.max_images:
        items = items[:r.max_images]
    listing = hashlib.sha256("\n".join(f"{c}::{m}" for c, m in items).encode()).hexdigest()
    stamps = hashlib.sha256("\n".join(str(os.stat(c).st_mtime_ns) for c in sorted({c for c, _ in items})).encode()).hexdigest()
    key = {"images": os.path.abspath(r.images), "listing": listing, "mtimes": stamps, "n": len(items),
           "resolution": [h, w], "extractor": ext_name, "pr_max": r.pr_max_images, "sfid": sfid}
    out = _cached(_cache_path(cache_dir, key), key, lambda: _features(
        _batched(len(items), batch_size, lambda i: _cover_crop(_read_image(*items[i]), h, w)),
        extractor, dims, device, r.pr_max_images, sfid))
    out = dict(out)
    out["source"] = f"images:{os.path.abspath(r.images)} ({len(items)} images at {h}x{w})"
    out["stats_from"] = f"images via {ext_name}"
    return out


def _sha256(path: str) -> str:
    """Hex sha256 of a file (shared with the checkpoint hash)."""
    from .sample import file_sha256

    return file_sha256(path)
