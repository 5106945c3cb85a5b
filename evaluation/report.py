"""Outputs of an evaluation: JSON, a Markdown table row, a sample grid PNG and the ADM-compatible .npz (atomic writes)."""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Iterable

import numpy as np
import torch


def fsync_replace(tmp: str, path: str) -> None:
    """fsync a finished temp file, then rename it over ``path`` (atomic on POSIX)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Pretty JSON, written atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    fsync_replace(tmp, path)


MD_HEADER = ("| checkpoint | sha256 | resolution | solver | steps | CFG | interval | S_max | N | FID | sFID | IS | "
             "Precision | Recall |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(x, nd: int = 2) -> str:
    """A number for the table, or an en dash when the metric was not computed."""
    return "–" if x is None else f"{x:.{nd}f}"


def markdown_row(r: dict) -> str:
    """One table row (MD_HEADER's columns) from a per-resolution result dict."""
    s = r["sampling"]
    iv = s.get("guidance_interval")
    return (f"| {r['checkpoint']['name']} | {r['checkpoint']['sha256'][:12]} | {r['resolution'][0]}x{r['resolution'][1]} "
            f"| {s['solver']} | {s['steps']} | {s['cfg_scale']} | {iv if iv else '–'} | {s['smax_policy']} "
            f"| {r['num_samples']} | {_fmt(r['metrics']['fid'])} | {_fmt(r['metrics']['sfid'])} "
            f"| {_fmt(r['metrics']['is'])} | {_fmt(r['metrics']['precision'], 3)} | {_fmt(r['metrics']['recall'], 3)} |")


def write_markdown(path: str, rows: list[str]) -> None:
    """A Markdown table with the header and ``rows`` (atomic)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(MD_HEADER + "\n" + "\n".join(rows) + "\n")
    fsync_replace(tmp, path)


def make_grid(images: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """uint8 [n,H,W,3] -> one uint8 image [rows·H, ncol·W, 3] (row-major, black padding)."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, q = divmod(i, ncol)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def save_png(path: str, arr: np.ndarray) -> None:
    """Write a uint8 HxWx3 array as PNG atomically."""
    from PIL import Image

    tmp = f"{path}.tmp.{os.getpid()}.png"
    Image.fromarray(arr).save(tmp)
    fsync_replace(tmp, path)


def write_adm_npz(path: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, h: int, w: int,
                  labels: np.ndarray) -> None:
    """ADM/DiT sample batch: ``arr_0`` uint8 [total,H,W,3] streamed chunk by chunk (never all in RAM), ``arr_1`` labels."""
    tmp = f"{path}.tmp.{os.getpid()}"
    written = 0
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (total, h, w, 3)})
            for _, imgs in batches:
                if tuple(imgs.shape[1:]) != (h, w, 3) or imgs.dtype != torch.uint8:
                    raise ValueError(f"npz batch has {imgs.dtype} {tuple(imgs.shape)}, expected uint8 [n,{h},{w},3]")
                f.write(np.ascontiguousarray(imgs.numpy()).tobytes())
                written += imgs.shape[0]
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    if written != total:
        os.remove(tmp)
        raise RuntimeError(f"{path}: wrote {written} images, expected {total}")
    fsync_replace(tmp, path)
