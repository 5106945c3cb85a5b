"""Streaming statistics in float64: per-rank sums that merge by addition and all-reduce across ranks.

``FeatureStats`` keeps n, Σf and Σfᵀf of D-dim features (-> mean, covariance for FID/sFID).
``ISStats`` keeps, per Inception-score split, n, Σp and Σ p·log p of softmax(logits) (-> IS), so that
IS needs no stored logits. Splits are contiguous ranges of the sample index (ADM's layout), which
makes the result independent of how samples were distributed over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce_sum(tensors: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Sum float64 tensors over all ranks in one collective (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out


class FeatureStats:
    """n, Σf, Σfᵀf of D-dim features in float64 (EDM2-style streaming FID statistics)."""

    def __init__(self, dim: int, device="cpu"):
        self.dim = dim
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor) -> None:
        """Add a batch [N, D] (any float dtype; accumulated in float64)."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got {tuple(feats.shape)}")
        f = feats.to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f                                                      # (D, D)

    def merge(self, other: "FeatureStats") -> None:
        """Add another accumulator's sums into this one."""
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)

    def all_reduce(self, comm_device="cpu") -> None:
        """Sum the accumulators of all ranks in place (``comm_device``: cuda for NCCL, cpu for gloo)."""
        dev = self.sum.device
        self.n, self.sum, self.outer = (t.to(dev) for t in _all_reduce_sum([self.n, self.sum, self.outer], comm_device))

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [D], unbiased covariance [D, D]) in float64 on the CPU (np.cov convention, n − 1)."""
        n = float(self.n)
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {int(n)}")
        mu = self.sum.cpu() / n
        cov = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov


class ISStats:
    """Per-split n, Σp, Σ p·log p of softmax(logits) in float64; split of sample i = i·splits // total."""

    def __init__(self, num_classes: int, total: int, splits: int = 10, device="cpu"):
        if total < splits:
            raise ValueError(f"Inception score needs at least {splits} samples (one per split), got {total}")
        self.total, self.splits = total, splits
        self.n = torch.zeros(splits, dtype=torch.float64, device=device)
        self.p_sum = torch.zeros(splits, num_classes, dtype=torch.float64, device=device)
        self.plogp = torch.zeros(splits, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Add logits [N, L] of the samples with global indices [N]."""
        dev = self.n.device
        p = torch.softmax(logits.to(device=dev, dtype=torch.float64), dim=1)       # (N, L)
        split = (indices.to(device=dev, dtype=torch.long) * self.splits) // self.total
        if (split < 0).any() or (split >= self.splits).any():
            raise ValueError(f"sample indices must lie in [0, {self.total})")
        self.n.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))       # 0·log 0 = 0

    def merge(self, other: "ISStats") -> None:
        """Add another accumulator's sums into this one."""
        self.n += other.n.to(self.n.device)
        self.p_sum += other.p_sum.to(self.p_sum.device)
        self.plogp += other.plogp.to(self.plogp.device)

    def all_reduce(self, comm_device="cpu") -> None:
        """Sum the accumulators of all ranks in place."""
        dev = self.n.device
        self.n, self.p_sum, self.plogp = (t.to(dev) for t in _all_reduce_sum([self.n, self.p_sum, self.plogp], comm_device))
