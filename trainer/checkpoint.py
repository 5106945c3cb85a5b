"""Checkpoint directories: one per step, complete only when the COMPLETE marker is written last.

Layout: ``{run_dir}/checkpoints/nimg_{nimg:012d}/`` holding the strategy's training state
(model + optimizer + EMA, sharded where the strategy shards), ``loader.json``, ``meta.json``
(progress state, world size, strategy, resolved config, wandb id), per-rank RNG states in
``rng_rank{r}.pt``, consolidated ``ema.safetensors`` and
``model.safetensors`` for evaluation, and ``COMPLETE``. Everything is written into a
``.tmp-…`` directory that is renamed into place, then marked: a crash never leaves a directory
that looks complete, and a half-written one is ignored (with a warning) and removed.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

from . import dist

MARKER = "COMPLETE"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file, fsync and rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Atomic safetensors write (contiguous CPU tensors, string metadata)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a checkpoint directory (its ema.safetensors)."""
    if os.path.isdir(path):
        path = os.path.join(path, "ema.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise ValueError(f"corrupt or unreadable weights file {path}: {e}") from None


def load_state_file(path: str, map_location="cpu", missing_hint: str = "") -> dict:
    """A file written with torch.save, loaded with weights_only=True; a missing or corrupt file names itself."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file missing: {path}{missing_hint}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from None


class CheckpointManager:
    """Names, writes atomically, finds and prunes checkpoint directories of one run."""

    def __init__(self, run_dir: str, keep_last: int = 2, keep_every_nimg: int = 0):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last, self.keep_every_nimg = keep_last, keep_every_nimg
        os.makedirs(self.root, exist_ok=True)

    def path(self, nimg: int) -> str:
        return os.path.join(self.root, f"nimg_{nimg:012d}")

    def complete(self) -> list[tuple[int, str]]:
        """(nimg, path) of complete checkpoints, oldest first; warns about incomplete ones."""
        out = []
        for name in sorted(os.listdir(self.root)):
            p = os.path.join(self.root, name)
            if not name.startswith("nimg_"):
                if name.startswith(".tmp-") and dist.get_rank() == 0:
                    warnings.warn(f"ignoring half-written checkpoint {p}")
                continue
            if not os.path.exists(os.path.join(p, MARKER)):
                warnings.warn(f"ignoring incomplete checkpoint {p} (no {MARKER} marker)")
                continue
            out.append((int(name[5:]), p))
        return out

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1][1] if done else None

    def begin(self, nimg: int) -> str:
        """A fresh temp directory every rank writes into (same name on all ranks)."""
        tmp = os.path.join(self.root, f".tmp-nimg_{nimg:012d}")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        return tmp

    def commit(self, tmp: str, nimg: int) -> str:
        """After every rank wrote into ``tmp``: rename into place, write the marker last, prune."""
        dist.barrier()
        final = self.path(nimg)
        if dist.get_rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(final, MARKER), f"{nimg}\n")
            self.prune()
        dist.barrier()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep_last`` and every multiple of ``keep_every_nimg``; drop stale temp dirs."""
        done = self.complete()
        keep = {p for _, p in done[-self.keep_last:]} if self.keep_last > 0 else {p for _, p in done}
        if self.keep_every_nimg:
            keep |= {p for n, p in done if n % self.keep_every_nimg == 0}
        for _, p in done:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def read_json(path: str) -> dict:
    """A checkpoint's JSON file; missing or corrupt files are errors naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file missing: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from None


def read_meta(path: str) -> dict:
    """``meta.json`` of a checkpoint directory."""
    return read_json(os.path.join(path, "meta.json"))
