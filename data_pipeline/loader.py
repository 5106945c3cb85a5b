"""Bucketed, distributed, exactly resumable loader over latent shards (the object the trainer consumes).

    loader = build_loader(LoaderConfig(manifest="/data/in256/manifest.json", batch_size=32), rank, world_size)
    for batch in loader:            # {"x": fp32 [B,C,h,w] (sampled, x scale), "y": int64 [B], "nimg_global": G, ...}
        ...
        ckpt["loader"] = loader.state_dict()   # small JSON dict: the position of the NEXT batch

Every global step is one bucket (one latent shape, one batch size on all ranks); its records and their noise are a
pure function of (seed, epoch, position) (see ``data_pipeline.plan``). The position is counted in samples seen by all
ranks together, and only batches handed to the caller count (prefetched ones do not), so ``load_state_dict`` restores
the exact next batch. Resuming on a different number of ranks is exact as long as every bucket's GLOBAL batch
``G_b`` is unchanged: with ``batch_policy="fixed"`` keep ``batch_size * world_size`` constant (e.g. 2 ranks x 32 ->
1 rank x 64), or simply set ``global_batch_size``; with ``"tokens"`` keep ``tokens_per_batch * world_size`` constant
(or set ``global_tokens``) and set ``batch_quantum`` to a multiple of every world size you will use. Anything else
is refused with an error saying which bucket changed; to continue anyway (new stage, new data, new batch) start the
loader fresh, e.g. with ``start_epoch`` = the saved epoch + 1.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.plan import EpochPlan, make_epoch_plan
from data_pipeline.shards import FORMATS, ShardError, open_shard

STATE_VERSION = 1


@dataclass
class LoaderConfig:
    """Latent loader options (plain types: this sits under the trainer's ``data.latents`` config node)."""

    manifest: str = ""  # manifest.json written by data_pipeline.encode, or its directory; shards are relative to it
    format: str = ""  # "wds" | "mds"; "" = whatever the manifest says (a mismatch is an error)
    batch_policy: str = "fixed"  # "fixed": batch_size per rank | "tokens": tokens_per_batch per rank, per bucket
    batch_size: int = 32  # fixed: samples per rank per step (global batch = batch_size * world_size)
    global_batch_size: int = 0  # fixed: if > 0, samples per step over all ranks (overrides batch_size; must divide)
    tokens_per_batch: int = 0  # tokens: latent tokens per rank per step; bucket b gets ~tokens_per_batch/tokens_b
    global_tokens: int = 0  # tokens: if > 0, tokens per step over all ranks (overrides tokens_per_batch)
    patch_size: int = 2  # tokens of a latent [C,h,w] = (h/patch_size) * (w/patch_size)
    batch_quantum: int = 0  # tokens: global batch rounded down to a multiple of this (0 = world_size)
    remainder: str = "drop"  # per bucket and epoch: "drop" the last partial global batch or "pad" it by wrapping
    buckets: List[int] = field(default_factory=list)  # bucket ids to use; empty = all
    seed: int = 0  # order, noise and flips derive from (seed, epoch, position)
    start_epoch: int = 0  # first epoch of a fresh loader (position 0 = start of this epoch)
    flip_prob: float = 0.5  # P(use the moments of the horizontally flipped image); needs flips in the manifest
    sample: bool = True  # draw mean + exp(logvar/2) * eps; False = use the posterior mean
    scale_factor: float = 0.0  # latents x this; 0 = the manifest's VAE scale factor (0.18215 for SD VAEs)
    num_workers: int = 2  # worker processes (each handles every num_workers-th step, order preserved)
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool = False  # pin batches (for async host-to-GPU copies)
    verify_checksums: bool = False  # sha256 each shard against the manifest when first opened (per process)
    max_open_shards: int = 64  # open file descriptors kept per worker (shard indexes are always kept)


def load_manifest(path: str) -> tuple[dict, str]:
    """(manifest dict, its directory); a missing or bad manifest is an error naming the path."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"latent manifest {path!r}: cannot read ({e})") from e
    for k in ("format", "vae", "buckets", "shards", "moments"):
        if k not in m:
            raise ValueError(f"latent manifest {path!r}: missing field {k!r}")
    return m, os.path.dirname(os.path.abspath(path))


class _Layout:
    """Record ids over the manifest's shards: id = shard start + index in shard; members per bucket; shapes."""

    def __init__(self, cfg: LoaderConfig, manifest: dict):
        self.num_moments = len(manifest["moments"])
        c = int(manifest["vae"]["latent_channels"])
        self.shapes = {int(b["id"]): (self.num_moments, c, *b["latent_hw"]) for b in manifest["buckets"]}
        self.shards = manifest["shards"]
        counts = np.array([s["count"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_records = int(self.starts[-1])
        use = set(cfg.buckets) if cfg.buckets else {int(s["bucket"]) for s in self.shards}
        unknown = use - set(self.shapes)
        if unknown:
            raise ValueError(f"LoaderConfig.buckets: unknown bucket ids {sorted(unknown)} (manifest has {sorted(self.shapes)})")
        self.bucket_ids = sorted(use)
        per: Dict[int, list] = {b: [] for b in self.bucket_ids}
        for k, s in enumerate(self.shards):
            if int(s["bucket"]) in per:
                per[int(s["bucket"])].append(np.arange(self.starts[k], self.starts[k + 1], dtype=np.int64))
        self.members = [np.concatenate(per[b]) if per[b] else np.zeros(0, np.int64) for b in self.bucket_ids]

    def locate(self, rid: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, rid, side="right")) - 1
        return k, int(rid - self.starts[k])


def global_batch_sizes(cfg: LoaderConfig, layout: _Layout, world_size: int) -> List[int]:
    """G_b for every used bucket (same order as ``layout.bucket_ids``); each is a multiple of world_size."""
    if cfg.batch_policy == "fixed":
        if cfg.global_batch_size > 0:
            if cfg.global_batch_size % world_size:
                raise ValueError(f"LoaderConfig.global_batch_size={cfg.global_batch_size} is not divisible by "
                                 f"world_size={world_size}")
            return [cfg.global_batch_size] * len(layout.bucket_ids)
        if cfg.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size={cfg.batch_size} must be >= 1")
        return [cfg.batch_size * world_size] * len(layout.bucket_ids)
    if cfg.batch_policy != "tokens":
        raise ValueError(f"LoaderConfig.batch_policy={cfg.batch_policy!r}: expected 'fixed' or 'tokens'")
    q = cfg.batch_quantum or world_size
    if q % world_size:
        raise ValueError(f"LoaderConfig.batch_quantum={q} is not a multiple of world_size={world_size}")
    total = cfg.global_tokens if cfg.global_tokens > 0 else cfg.tokens_per_batch * world_size
    out = []
    for b in layout.bucket_ids:
        _, _, h, w = layout.shapes[b]
        t = (h // cfg.patch_size) * (w // cfg.patch_size)
        g = (total // t) // q * q
        if g < q:
            raise ValueError(f"bucket {b} ({h}x{w} latent, {t} tokens): {total} tokens per global step hold fewer "
                             f"than batch_quantum={q} samples (raise tokens_per_batch/global_tokens)")
        out.append(g)
    return out


def _seed64(*words: int) -> int:
    """SplitMix64 over the words -> a 63-bit seed for torch.Generator (cheap, well mixed, no global state)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class LatentStream(IterableDataset):
    """This rank's batches from global sample position ``start`` on (infinite; workers take every W-th step)."""

    def __init__(self, cfg: LoaderConfig, manifest: dict, root: str, layout: _Layout, global_batches: List[int],
                 rank: int, world_size: int, start: int):
        self.cfg, self.root, self.layout = cfg, root, layout
        self.fmt = manifest["format"]
        self.scale = float(cfg.scale_factor or manifest["vae"]["scale_factor"])
        self.global_batches, self.rank, self.world, self.start = global_batches, rank, world_size, start
        self.epoch_samples = int(sum(n * g for n, g in zip(
            _steps(layout, global_batches, cfg.remainder), global_batches)))
        self._plans: "OrderedDict[int, EpochPlan]" = OrderedDict()
        self._gen = torch.Generator()  # re-seeded per sample
        self._index: Dict[int, object] = {}
        self._open: "OrderedDict[int, object]" = OrderedDict()

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan (cached: two epochs at most)."""
        if epoch not in self._plans:
            self._plans[epoch] = make_epoch_plan(self.layout.members, self.global_batches, self.cfg.seed, epoch,
                                                 self.cfg.remainder)
            while len(self._plans) > 2:
                self._plans.popitem(last=False)
        return self._plans[epoch]

    def _shard(self, k: int):
        """Shard k: its index is kept for good (16 bytes/record); at most max_open_shards descriptors stay open."""
        sh = self._index.get(k)
        if sh is None:
            entry = self.layout.shards[k]
            sh = self._index[k] = open_shard(self.root, entry, self.fmt, self.layout.shapes[int(entry["bucket"])],
                                             verify=self.cfg.verify_checksums)
        self._open[k] = sh
        self._open.move_to_end(k)
        while len(self._open) > self.cfg.max_open_shards:
            self._open.popitem(last=False)[1].close()
        return sh

    def make_batch(self, epoch: int, step: int) -> dict:
        """Materialise this rank's slice of global step ``step`` of ``epoch``."""
        plan = self.plan(epoch)
        rids = plan.records[step]
        g = len(rids)
        per_rank = g // self.world
        lo = self.rank * per_rank
        first_slot = int(plan.start[step]) + lo  # sample position in the epoch of this rank's first sample
        bucket = self.layout.bucket_ids[int(plan.bucket[step])]
        shape = self.layout.shapes[bucket][1:]  # (C, h, w)
        draw = self.cfg.sample or self.cfg.flip_prob > 0
        eps = torch.empty((per_rank, *shape)) if self.cfg.sample else None  # (B, C, h, w)
        picked, labels, keys = [], [], []
        for j, rid in enumerate(rids[lo: lo + per_rank]):
            k, i = self.layout.locate(int(rid))
            sh = self._shard(k)
            key, label, m = sh.read(i)  # m: (K, C, h, w) fp16
            flip = False
            if draw:
                # One generator per (seed, epoch, position): the draw does not depend on ranks or workers.
                gen = self._gen.manual_seed(_seed64(self.cfg.seed, epoch, first_slot + j))
                flip = bool(torch.rand((), generator=gen) < self.cfg.flip_prob)
                if self.cfg.sample:
                    torch.randn(shape, generator=gen, out=eps[j])
            if flip and m.shape[0] < 4:
                raise ShardError(f"shard {sh.path}, key {key}: flip_prob > 0 but no flipped moments "
                                 "(encoded with --no-flip); set flip_prob: 0")
            picked.append(m[2:4] if flip else m[0:2])
            labels.append(label)
            keys.append(key)
        mom = torch.from_numpy(np.stack(picked)).float()  # (B, 2, C, h, w)
        mean = mom[:, 0]
        if self.cfg.sample:
            mean = mean + torch.exp(0.5 * mom[:, 1].clamp_(-30.0, 20.0)) * eps  # posterior sample
        x = mean.mul_(self.scale) if self.cfg.sample else mean * self.scale  # mean is a fresh tensor only if sampled
        return {"x": x, "y": torch.tensor(labels, dtype=torch.int64), "nimg_global": g,
                "bucket": bucket, "keys": keys, "epoch": epoch,
                "_end": epoch * self.epoch_samples + int(plan.start[step + 1])}

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        epoch, in_epoch = divmod(self.start, self.epoch_samples)
        step = self.plan(epoch).step_at(in_epoch)
        k = 0  # steps since start; worker wid takes k = wid, wid + nw, ... (DataLoader round-robin keeps the order)
        while True:
            plan = self.plan(epoch)
            while step < len(plan.records):
                if k % nw == wid:
                    yield self.make_batch(epoch, step)
                k += 1
                step += 1
            epoch, step = epoch + 1, 0


def _steps(layout: _Layout, global_batches: List[int], remainder: str) -> List[int]:
    from data_pipeline.plan import steps_per_bucket

    return steps_per_bucket([len(m) for m in layout.members], global_batches, remainder)


class LatentLoader:
    """Iterable over this rank's batches with ``state_dict``/``load_state_dict`` (position of the next batch)."""

    def __init__(self, cfg: LoaderConfig, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifest, self.root = load_manifest(cfg.manifest)
        fmt = self.manifest["format"]
        if fmt not in FORMATS or (cfg.format and cfg.format != fmt):
            raise ValueError(f"LoaderConfig.format={cfg.format!r} but manifest {cfg.manifest!r} holds {fmt!r} shards")
        self.layout = _Layout(cfg, self.manifest)
        if cfg.flip_prob > 0 and self.layout.num_moments < 4:
            raise ValueError(f"LoaderConfig.flip_prob={cfg.flip_prob} but {cfg.manifest!r} holds no flipped moments "
                             "(encoded with --no-flip): set flip_prob: 0 or re-encode with flips")
        missing = [e["path"] for e in self.layout.shards if not os.path.exists(os.path.join(self.root, e["path"]))]
        if missing:  # fail now, not hours into training when the plan first reaches the shard
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {cfg.manifest!r} are missing under "
                                    f"{self.root}: {missing[:5]}")
        self.global_batches = global_batch_sizes(cfg, self.layout, world_size)
        steps = _steps(self.layout, self.global_batches, cfg.remainder)
        self.epoch_samples = int(sum(n * g for n, g in zip(steps, self.global_batches)))
        if self.epoch_samples == 0:
            detail = ", ".join(f"bucket {b}: {len(m)} records < G={g}" for b, m, g in
                               zip(self.layout.bucket_ids, self.layout.members, self.global_batches))
            raise ValueError(f"no bucket fills one global batch ({detail}); lower the batch size or use remainder='pad'")
        # Records that never appear in an epoch are reported, not dropped silently.
        self.dropped_per_epoch = {b: len(m) - n * g for b, m, n, g in
                                  zip(self.layout.bucket_ids, self.layout.members, steps, self.global_batches)
                                  if cfg.remainder == "drop" and len(m) - n * g}
        small = {b: len(m) for b, m, g in zip(self.layout.bucket_ids, self.layout.members, self.global_batches)
                 if cfg.remainder == "pad" and 0 < len(m) < g}
        if small and rank == 0:
            logging.getLogger(__name__).warning(
                "remainder='pad': buckets %s hold fewer records than their global batch, so their steps repeat "
                "records (also across ranks); pass buckets=[...] without them to avoid it", small)
        if self.dropped_per_epoch and rank == 0:
            logging.getLogger(__name__).warning(
                "remainder='drop': %d of %d records are left out of each epoch (a different subset every epoch); "
                "per bucket: %s", sum(self.dropped_per_epoch.values()), self.layout.num_records, self.dropped_per_epoch)
        self.samples_seen = cfg.start_epoch * self.epoch_samples
        self._generation = 0

    @property
    def steps_per_epoch(self) -> int:
        """Global steps in one epoch."""
        return sum(_steps(self.layout, self.global_batches, self.cfg.remainder))

    def _stream(self) -> LatentStream:
        return LatentStream(self.cfg, self.manifest, self.root, self.layout, self.global_batches, self.rank,
                            self.world_size, self.samples_seen)

    def __iter__(self) -> Iterator[dict]:
        gen = self._generation
        stream = self._stream()
        if self.cfg.num_workers > 0:
            it = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                 prefetch_factor=self.cfg.prefetch_factor, pin_memory=self.cfg.pin_memory,
                                 persistent_workers=False))
        else:
            it = iter(stream)
        try:
            for batch in it:
                if gen != self._generation:
                    raise RuntimeError("load_state_dict() was called while iterating: call iter(loader) again")
                self.samples_seen = int(batch.pop("_end"))  # this batch is now consumed
                yield batch
        finally:
            del it  # shuts the workers down now (on break, error or state reload), not at garbage collection

    def state_dict(self) -> dict:
        """Position of the next batch plus what must match on load (JSON-serialisable, a few hundred bytes)."""
        return {"version": STATE_VERSION, "samples_seen": self.samples_seen,
                "epoch": self.samples_seen // self.epoch_samples,
                "sample_in_epoch": self.samples_seen % self.epoch_samples, "seed": self.cfg.seed,
                "remainder": self.cfg.remainder, "num_records": self.layout.num_records,
                "global_batches": {str(b): g for b, g in zip(self.layout.bucket_ids, self.global_batches)}}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; refuses (naming what changed) when the plan would not be the same."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        now = self.state_dict()
        for k in ("seed", "remainder", "num_records"):
            if state[k] != now[k]:
                raise ValueError(f"loader state: {k} was {state[k]!r}, is {now[k]!r} now; the saved position does not "
                                 "apply to this data/plan (start this loader fresh instead)")
        if state["global_batches"] != now["global_batches"]:
            diff = [f"bucket {b}: {state['global_batches'].get(b)} -> {now['global_batches'].get(b)}"
                    for b in sorted(set(state["global_batches"]) | set(now["global_batches"]), key=int)
                    if state["global_batches"].get(b) != now["global_batches"].get(b)]
            raise ValueError("loader state: the global batch per bucket changed (" + "; ".join(diff) + "). Resuming on "
                             f"{self.world_size} rank(s) is exact only if batch_size (or tokens_per_batch) x world_size "
                             "and batch_quantum give the same global batches; adjust them or start the loader fresh.")
        self.samples_seen = int(state["samples_seen"])
        self._generation += 1


def build_loader(cfg: LoaderConfig, rank: int, world_size: int) -> LatentLoader:
    """The trainer's entry point: a LatentLoader for this rank."""
    return LatentLoader(cfg, rank, world_size)
