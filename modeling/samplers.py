"""Flow samplers, k-diffusion style: each is a small @torch.no_grad() function over a time grid.

``model_fn(x, t, y) -> v`` is the velocity (wrap a model with guidance.cfg_wrapper and/or
smax.with_smax_policy first). Time runs from t=0 (noise) to t=1 (data).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


# ----------------------------------------------------------------------------- noise and time grids
def _sample_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, index, stream), never on rank or batch layout."""
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def noise_for_indices(indices, shape, seed: int, stream: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise [len(indices), *shape]; row i depends only on (seed, indices[i], stream)."""
    rows = [torch.randn(tuple(shape), generator=_sample_generator(seed, int(i), stream)) for i in indices]
    return torch.stack(rows).to(device=device, dtype=dtype)


class StepNoise:
    """Per-sample, per-step noise for SDE samplers: step k of sample i uses stream k+1 of (seed, i)."""

    def __init__(self, indices, seed: int):
        self.indices, self.seed = list(indices), seed

    def __call__(self, step: int, like: torch.Tensor) -> torch.Tensor:
        return noise_for_indices(self.indices, like.shape[1:], self.seed, stream=step + 1, device=like.device, dtype=like.dtype)


def get_timesteps_uniform(steps: int, last_step: float | None = None, device=None) -> torch.Tensor:
    """Uniform grid 0 → 1 with ``steps`` intervals; with ``last_step`` the final interval has that length."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if last_step is None or last_step <= 0:
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    if steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
    ts = torch.linspace(0.0, 1.0 - last_step, steps, dtype=torch.float64, device=device)
    return torch.cat([ts, ts.new_ones(1)])


def _tb(t, x: torch.Tensor) -> torch.Tensor:
    """A scalar time as a [N] batch tensor in x's dtype (models embed t in fp32 anyway)."""
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- ODE solvers
@torch.no_grad()
def sample_euler(model_fn, x, y, ts, callback=None):
    """Euler ODE solver (first order)."""
    for i in range(len(ts) - 1):
        x = x + (ts[i + 1] - ts[i]).item() * model_fn(x, _tb(ts[i], x), y)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_heun(model_fn, x, y, ts, callback=None):
    """Heun's method (explicit trapezoidal, second order, 2 evaluations per step)."""
    for i in range(len(ts) - 1):
        dt = (ts[i + 1] - ts[i]).item()
        v0 = model_fn(x, _tb(ts[i], x), y)
        x_pred = x + dt * v0
        v1 = model_fn(x_pred, _tb(ts[i + 1], x), y)
        x = x + dt * 0.5 * (v0 + v1)
        if callback is not None:
            callback(i, x)
    return x


def _rk4_step(model_fn, x, y, t0, t1, v0=None):
    """One classical Runge–Kutta step; returns (x1, v0) so multistep bootstraps can reuse v0."""
    h = t1 - t0
    k1 = model_fn(x, _tb(t0, x), y) if v0 is None else v0
    k2 = model_fn(x + 0.5 * h * k1, _tb(t0 + 0.5 * h, x), y)
    k3 = model_fn(x + 0.5 * h * k2, _tb(t0 + 0.5 * h, x), y)
    k4 = model_fn(x + h * k3, _tb(t1, x), y)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), k1


_AB_COEFFS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@torch.no_grad()
def sample_ab(model_fn, x, y, ts, order: int = 2, bootstrap: str = "rk", callback=None):
    """Adams–Bashforth multistep (order 2–4) on a uniform grid, one evaluation per step.

    The first order−1 steps are bootstrapped: ``bootstrap="rk"`` uses RK4 steps (keeps the
    method's global order), ``"lower_order"`` uses AB of increasing order as the official sampler.
    """
    if order not in _AB_COEFFS:
        raise ValueError(f"Adams–Bashforth order must be 1..4, got {order}")
    dts = (ts[1:] - ts[:-1]).double()
    if (dts - dts[0]).abs().max() > 1e-9:
        raise ValueError("sample_ab needs a uniform time grid")
    h = dts[0].item()
    hist: list[torch.Tensor] = []   # newest first
    for i in range(len(ts) - 1):
        t0 = ts[i].item()
        if i < order - 1 and bootstrap == "rk":
            x, v = _rk4_step(model_fn, x, y, t0, t0 + h)
            hist.insert(0, v)
        else:
            hist.insert(0, model_fn(x, _tb(t0, x), y))
            coeffs = _AB_COEFFS[min(order, len(hist))]
            x = x + h * sum(c * v for c, v in zip(coeffs, hist))
        del hist[order:]
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def sample_adaptive(model_fn, x, y, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5", t0: float = 0.0, t1: float = 1.0):
    """Adaptive-step ODE solve (torchdiffeq, dopri5 by default) from t0 to t1; returns (x1, nfe)."""
    from torchdiffeq import odeint

    nfe = [0]

    def f(t, z):
        nfe[0] += 1
        return model_fn(z, _tb(t, z), y)

    ts = torch.tensor([t0, t1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    return odeint(f, x, ts, rtol=rtol, atol=atol, method=method)[-1], nfe[0]


# ----------------------------------------------------------------------------- SDE solver
@torch.no_grad()
def sample_euler_maruyama(model_fn, x, y, ts, noise, diffusion_scale: float = 1.0, callback=None):
    """Euler–Maruyama for the reverse-time SDE with diffusion w(t) = scale·(1−t) (official SiT/FlowDCN form).

    score s = (t·v − x)/(1 − t); x ← x + (v + w·s)·dt + √(2·w·dt)·ξ. A step that ends at t=1 is a
    plain ODE step (the score is singular there; use ``last_step`` in the grid, official 0.04).
    ``noise(step, like)`` gives ξ (e.g. StepNoise, so sample i's path depends only on (seed, i)).
    """
    for i in range(len(ts) - 1):
        t, dt = ts[i].item(), (ts[i + 1] - ts[i]).item()
        v = model_fn(x, _tb(t, x), y)
        if ts[i + 1].item() >= 1.0:
            x = x + v * dt
        else:
            w = diffusion_scale * (1.0 - t)
            score = (t * v - x) / (1.0 - t)
            x = x + (v + w * score) * dt + (2.0 * w * dt) ** 0.5 * noise(i, x)
        if callback is not None:
            callback(i, x)
    return x


# ----------------------------------------------------------------------------- dispatcher
@dataclass
class SamplerConfig:
    """Which solver and its knobs (official eval: euler_maruyama, 250 steps, last_step 0.04)."""

    solver: str = "euler_maruyama"   # euler | heun | euler_maruyama | ab2 | ab3 | ab4 | dopri5
    steps: int = 250
    last_step: float | None = 0.04   # length of the final interval (None: uniform grid)
    diffusion_scale: float = 1.0     # SDE: w(t) = scale·(1−t)
    ab_bootstrap: str = "rk"         # rk | lower_order
    rtol: float = 1e-4               # dopri5
    atol: float = 1e-4


SOLVERS = ("euler", "heun", "euler_maruyama", "ab2", "ab3", "ab4", "dopri5")


def sample(model_fn, x, y, cfg: SamplerConfig, noise=None):
    """Run the configured solver from noise x (t=0) to data (t=1)."""
    if cfg.solver not in SOLVERS:
        raise ValueError(f"unknown solver {cfg.solver!r}; choose from {SOLVERS}")
    if cfg.solver == "dopri5":
        return sample_adaptive(model_fn, x, y, rtol=cfg.rtol, atol=cfg.atol)[0]
    if cfg.solver.startswith("ab"):
        ts = get_timesteps_uniform(cfg.steps, device=x.device)
        return sample_ab(model_fn, x, y, ts, order=int(cfg.solver[2]), bootstrap=cfg.ab_bootstrap)
    ts = get_timesteps_uniform(cfg.steps, cfg.last_step, device=x.device)
    if cfg.solver == "euler":
        return sample_euler(model_fn, x, y, ts)
    if cfg.solver == "heun":
        return sample_heun(model_fn, x, y, ts)
    if noise is None:
        raise ValueError("euler_maruyama needs a noise source (e.g. StepNoise(indices, seed))")
    return sample_euler_maruyama(model_fn, x, y, ts, noise, cfg.diffusion_scale)
