"""The epoch plan: which records form each global step, as a pure function of (seed, epoch, record layout, batches).

Every global step draws ONE bucket: all ranks get the same latent shape and the same per-rank batch size, and rank
``r`` takes slots ``[r*B, (r+1)*B)`` of the step's global batch of ``G = B * world`` records, so the ranks' slices are
disjoint and every rank runs the same number of steps. Per epoch:

1. each bucket's records are permuted with ``rng(seed, epoch, bucket)`` and cut into global batches of that bucket's
   ``G_b``; the remainder is dropped (``"drop"``: other records are dropped in other epochs) or filled by wrapping
   around the same permutation (``"pad"``: some records appear twice);
2. the list of all steps is permuted with ``rng(seed, epoch)``, mixing buckets in proportion to their sizes.

An epoch always has the same number of samples (``epoch_samples``), so a position counted in samples seen
globally maps to (epoch, step) without replaying anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

_STEP_ORDER_STREAM = 1 << 30  # rng stream id for the step permutation, distinct from any bucket id


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


@dataclass
class EpochPlan:
    """Global steps of one epoch: ``bucket[s]``, ``records[s]`` (record ids, length G of that bucket), ``start[s]``
    (samples seen in the epoch before step s)."""

    bucket: np.ndarray  # (S,) int64
    records: List[np.ndarray]  # S arrays of global record ids
    start: np.ndarray  # (S + 1,) int64, start[-1] == epoch_samples

    def step_at(self, sample_in_epoch: int) -> int:
        """Step index whose first sample is ``sample_in_epoch`` (must be a step boundary)."""
        s = int(np.searchsorted(self.start, sample_in_epoch))
        if s >= len(self.start) or self.start[s] != sample_in_epoch:
            raise ValueError(f"sample_in_epoch={sample_in_epoch} is not a step boundary of this epoch's plan "
                             "(the global batch sizes changed since the state was saved?)")
        return s


def steps_per_bucket(counts: Sequence[int], global_batches: Sequence[int], remainder: str) -> List[int]:
    """Global steps each bucket contributes per epoch."""
    if remainder == "drop":
        return [n // g for n, g in zip(counts, global_batches)]
    if remainder == "pad":
        return [-(-n // g) for n, g in zip(counts, global_batches)]
    raise ValueError(f"remainder={remainder!r}: expected 'drop' or 'pad'")


def make_epoch_plan(members: Sequence[np.ndarray], global_batches: Sequence[int], seed: int, epoch: int,
                    remainder: str = "drop") -> EpochPlan:
    """Plan one epoch. ``members[b]``: record ids of bucket b (any order; sorted first); ``global_batches[b]``: G_b."""
    nsteps = steps_per_bucket([len(m) for m in members], global_batches, remainder)
    chunks, buckets = [], []
    for b, (ids, g, k) in enumerate(zip(members, global_batches, nsteps)):
        if k == 0:
            continue
        perm = _rng(seed, epoch, b).permutation(np.sort(np.asarray(ids, dtype=np.int64)))
        perm = np.resize(perm, k * g)  # pad: wraps around the permutation; drop: truncates
        chunks += list(perm.reshape(k, g))
        buckets += [b] * k
    order = _rng(seed, epoch, _STEP_ORDER_STREAM).permutation(len(chunks))
    records = [chunks[i] for i in order]
    bucket = np.asarray(buckets, dtype=np.int64)[order] if chunks else np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum([len(r) for r in records])]).astype(np.int64)
    return EpochPlan(bucket=bucket, records=records, start=start)
