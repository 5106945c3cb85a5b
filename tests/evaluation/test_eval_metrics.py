"""FID / IS / precision-recall / streaming statistics against closed forms and independent numpy/scipy code."""
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from evaluation.metrics import frechet_distance, inception_score, precision_recall
from evaluation.stats import FeatureStats, ISStats


def passthrough(x: torch.Tensor) -> dict:
    """A feature extractor that returns its input as the pool features (float32, as a real extractor would)."""
    return {"pool": x.float()}


def exact_gaussian_sample(mu: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n points whose sample mean is exactly mu and unbiased sample covariance exactly cov (float64)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T       # whiten: cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mu


def stream_stats(x: np.ndarray, batch: int = 37) -> FeatureStats:
    st = FeatureStats(x.shape[1])
    for i in range(0, len(x), batch):
        st.update(passthrough(torch.from_numpy(x[i:i + batch]))["pool"])
    return st


def adm_fid_ref(mu1, s1, mu2, s2) -> float:
    """The ADM evaluator's formula with scipy's general sqrtm (independent of our eigen-based version)."""
    covmean, _ = scipy.linalg.sqrtm(s1.dot(s2), disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_closed_form_2d_gaussians_through_passthrough_extractor():
    # For 2x2 SPD matrices tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (closed-form 2x2 square root).
    mu1, mu2 = np.array([0.5, -1.0]), np.array([2.0, 1.5])
    s1 = np.array([[2.0, 0.6], [0.6, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])   # does not commute with s1
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(
        np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    a, b = stream_stats(exact_gaussian_sample(mu1, s1, 5000, 0)), stream_stats(exact_gaussian_sample(mu2, s2, 3000, 1))
    (m1, c1), (m2, c2) = a.mean_cov(), b.mean_cov()
    # Features pass through float32 (like real extractor outputs), so agreement is to ~1e-6 relative.
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(closed, rel=2e-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, rel=1e-12)


def test_fid_closed_form_commuting_high_dim():
    # Shared eigenvectors: tr sqrt(S1 S2) = Σ sqrt(d1 d2), so FID = |Δμ|² + Σ (√d1 − √d2)².
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    d1, d2 = rng.uniform(0.1, 5, 64), rng.uniform(0.1, 5, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    got = frechet_distance(mu1, (q * d1) @ q.T, mu2, (q * d2) @ q.T)
    assert got == pytest.approx(closed, rel=1e-10)
    assert frechet_distance(mu1, (q * d1) @ q.T, mu1, (q * d1) @ q.T) == pytest.approx(0.0, abs=1e-9)


def test_streaming_stats_and_fid_match_numpy_scipy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24)) + 3.0
    y = rng.gamma(2.0, size=(250, 24)) @ rng.standard_normal((24, 24))
    sx, sy = stream_stats(x), stream_stats(y)
    # Float64 input: the streaming sums must reproduce numpy's mean/cov to float64 round-off.
    sx64 = FeatureStats(24)
    for i in range(0, 300, 50):
        sx64.update(torch.from_numpy(x[i:i + 50]))
    m, c = sx64.mean_cov()
    np.testing.assert_allclose(m.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(c.numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-11)
    ref = adm_fid_ref(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    (m1, c1), (m2, c2) = sx.mean_cov(), sy.mean_cov()
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-5)   # float32 features
    (m1, c1) = sx64.mean_cov()
    y64 = FeatureStats(24)
    y64.update(torch.from_numpy(y))
    (m2, c2) = y64.mean_cov()
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8)


def test_feature_stats_merge_equals_one_pass():
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((100, 8)))
    whole, a, b = FeatureStats(8), FeatureStats(8), FeatureStats(8)
    whole.update(x)
    a.update(x[:37])
    b.update(x[37:])
    a.merge(b)
    torch.testing.assert_close(a.mean_cov()[1], whole.mean_cov()[1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        a.update(torch.zeros(3, 7))


def adm_inception_score_ref(logits: np.ndarray, split_size: int) -> float:
    """ADM evaluator's IS: softmax, contiguous splits, exp(mean KL(p || mean p)), mean over splits."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_closed_forms():
    L, n = 10, 200
    idx = torch.arange(n)
    sharp = ISStats(L, n, splits=4)
    sharp.update(60.0 * torch.nn.functional.one_hot(idx % L, L).float(), idx)   # confident, all classes equally
    assert inception_score(sharp)[0] == pytest.approx(L, rel=1e-9)
    flat = ISStats(L, n, splits=4)
    flat.update(torch.zeros(n, L), idx)                                          # p(y|x) = p(y): IS = 1
    assert inception_score(flat) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_matches_adm_in_any_update_order():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((500, 30)) * 3
    ref = adm_inception_score_ref(logits, split_size=50)
    st = ISStats(30, 500, splits=10)
    perm = torch.from_numpy(rng.permutation(500))
    for part in perm.split(64):      # updates arrive in any order/batching, as from several ranks
        st.update(torch.from_numpy(logits[part.numpy()]), part)
    assert inception_score(st)[0] == pytest.approx(ref, rel=1e-10)


def pr_ref(real: np.ndarray, fake: np.ndarray, k: int):
    """Brute-force improved precision/recall with scipy distances (independent implementation)."""
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]          # column 0 is the point itself
    rr, rf = radii(real), radii(fake)
    prec = (cdist(fake, real) <= rr[None]).any(1).mean()
    rec = (cdist(real, fake) <= rf[None]).any(1).mean()
    return prec, rec


def test_precision_recall_matches_bruteforce():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((150, 12))
    fake = rng.standard_normal((120, 12)) * 1.4 + 0.3
    p, r = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3, batch=32)
    pe, re = pr_ref(real, fake, 3)
    assert (p, r) == pytest.approx((pe, re), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    same = precision_recall(torch.from_numpy(real), torch.from_numpy(real), k=3)
    assert same == (1.0, 1.0)
    far = precision_recall(torch.from_numpy(real), torch.from_numpy(fake + 100.0), k=3)
    assert far == (0.0, 0.0)
