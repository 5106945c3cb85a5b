"""FID / sFID (Fréchet distance), Inception score and improved precision/recall, all in float64 where it matters."""
from __future__ import annotations

import math

import torch

from .stats import ISStats


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root via eigh (negative eigenvalues from round-off are clipped to 0)."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = |mu1 − mu2|² + tr(S1 + S2 − 2 (S1 S2)^½), computed in float64.

    tr (S1 S2)^½ = tr (S1^½ S2 S1^½)^½: the inner matrix is symmetric PSD, so an eigen-decomposition
    is stable where scipy's general sqrtm can return complex round-off (ADM adds eps·I then).
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics shapes differ: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    r1 = _sqrtm_psd(s1)
    w = torch.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = w.clamp(min=0).sqrt().sum()
    d = ((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return float(d)


def inception_score(stats: ISStats) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's marginal (ADM/torch-fidelity)."""
    if (stats.n == 0).any():
        raise ValueError(f"every IS split needs samples; counts per split {stats.n.tolist()}")
    n = stats.n.cpu()
    p_sum = stats.p_sum.cpu()
    py = p_sum / n[:, None]                                                   # (splits, L) marginal
    # mean KL = (Σ_i Σ_c p_ic log p_ic − Σ_c (Σ_i p_ic) log py_c) / n
    cross = torch.special.xlogy(p_sum, py).sum(1)
    scores = torch.exp((stats.plogp.cpu() - cross) / n)
    return float(scores.mean()), float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances [len(a), len(b)] (clamped at 0)."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None] - 2 * a @ b.T
    return d.clamp_(min=0)


def knn_radii(feats: torch.Tensor, k: int = 3, batch: int = 4096) -> torch.Tensor:
    """Squared distance of every feature to its k-th nearest neighbour in the same set (itself excluded)."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} features for k-NN radii, got {feats.shape[0]}")
    out = torch.empty(feats.shape[0], dtype=feats.dtype, device=feats.device)
    for i in range(0, feats.shape[0], batch):
        d = _sq_dists(feats[i:i + batch], feats)
        out[i:i + batch] = d.kthvalue(k + 1, dim=1).values                   # k+1: the 0 distance to itself
    return out


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    """Fraction of ``query`` inside at least one ball (support_j, radii_j)."""
    inside = 0
    for i in range(0, query.shape[0], batch):
        d = _sq_dists(query[i:i + batch], support)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / query.shape[0]


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 4096,
                     device=None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls in feature space.

    precision = share of fake features inside the real manifold, recall = share of real features
    inside the fake manifold. Distances in float32 on ``device`` (GPU when given), like ADM's evaluator.
    """
    dev = device or real.device
    real, fake = real.to(dev, torch.float32), fake.to(dev, torch.float32)
    r_real, r_fake = knn_radii(real, k, batch), knn_radii(fake, k, batch)
    return _coverage(fake, real, r_real, batch), _coverage(real, fake, r_fake, batch)


def fid_from_stats(a: dict, b: dict, key: str = "") -> float:
    """Fréchet distance between two {"mu", "sigma"}-like dicts (``key`` "" for pool, "_s" for spatial)."""
    return frechet_distance(a["mu" + key], a["sigma" + key], b["mu" + key], b["sigma" + key])


def is_finite(x: float) -> bool:
    """True for a real finite number."""
    return isinstance(x, float) and math.isfinite(x)
