"""Samplers on a Gaussian toy flow whose ODE has a closed-form solution; orders of convergence."""
import math

import pytest
import torch

from modeling.guidance import cfg_wrapper
from modeling.samplers import (SamplerConfig, StepNoise, get_timesteps_uniform, noise_for_indices, sample, sample_ab,
                               sample_adaptive, sample_euler, sample_euler_maruyama, sample_heun)

MU, SD = 1.5, 0.5   # data distribution N(MU, SD²) per coordinate; noise N(0, 1)


def toy_velocity(x, t, y=None):
    """Exact marginal velocity of x_t = t·x + (1−t)·ε for Gaussian data: μ + s'(t)/s(t)·(x − tμ)."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    s2 = t ** 2 * SD ** 2 + (1 - t) ** 2
    return MU + (t * SD ** 2 - (1 - t)) / s2 * (x - t * MU)


def exact_endpoint(x0):
    return MU + SD * x0     # the ODE flow maps noise x0 to MU + SD·x0


X0 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(11, 1)
Y = torch.zeros(11, dtype=torch.long)


def err(solver, steps):
    return (solver(toy_velocity, X0.clone(), Y, get_timesteps_uniform(steps)) - exact_endpoint(X0)).abs().max().item()


@pytest.mark.parametrize("name,solver,order", [
    ("euler", sample_euler, 1),
    ("heun", sample_heun, 2),
    ("ab2", lambda f, x, y, ts: sample_ab(f, x, y, ts, order=2), 2),
    ("ab3", lambda f, x, y, ts: sample_ab(f, x, y, ts, order=3), 3),
    ("ab4", lambda f, x, y, ts: sample_ab(f, x, y, ts, order=4), 4),
])
def test_convergence_order(name, solver, order):
    e1, e2 = err(solver, 32), err(solver, 64)
    observed = math.log2(e1 / e2)
    # at least the method's order (AB4 shows a little more on this smooth field), and not a higher-order method
    assert order - 0.35 < observed < order + 1.0, (name, e1, e2, observed)


def test_ab_lower_order_bootstrap_runs_and_converges():
    e = [(sample_ab(toy_velocity, X0.clone(), Y, get_timesteps_uniform(n), order=2, bootstrap="lower_order")
          - exact_endpoint(X0)).abs().max().item() for n in (32, 64)]
    assert e[1] < e[0] / 3


def test_adaptive_error_shrinks_with_tolerance():
    e_loose = (sample_adaptive(toy_velocity, X0.clone(), Y, rtol=1e-3, atol=1e-3)[0] - exact_endpoint(X0)).abs().max()
    x, nfe = sample_adaptive(toy_velocity, X0.clone(), Y, rtol=1e-8, atol=1e-8)
    e_tight = (x - exact_endpoint(X0)).abs().max()
    assert e_tight < 1e-6 and e_tight < e_loose / 100 and nfe > 10


def test_euler_maruyama_weak_convergence_to_data_distribution():
    # The SDE must end at the data distribution N(MU, SD²); its moment error shrinks with the step count.
    # A larger diffusion scale makes the discretisation error visible above the sampling noise (~1e-3).
    n = 50_000
    x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = (x0 - x0.mean()) / x0.std()
    y = torch.zeros(n, dtype=torch.long)

    def moment_err(steps, scale):
        x = sample_euler_maruyama(toy_velocity, x0.clone(), y, get_timesteps_uniform(steps),
                                  lambda i, like: torch.randn(like.shape, generator=torch.Generator().manual_seed(i), dtype=like.dtype),
                                  diffusion_scale=scale)
        return abs(x.mean().item() - MU) + abs(x.var().item() - SD ** 2)

    coarse, fine = moment_err(8, 3.0), moment_err(64, 3.0)
    assert fine < coarse / 5 and fine < 0.012, (coarse, fine)
    assert moment_err(128, 1.0) < 0.015        # official diffusion w = 1 − t


def test_sde_with_zero_diffusion_is_euler():
    ts = get_timesteps_uniform(20, last_step=0.04)
    a = sample_euler_maruyama(toy_velocity, X0.clone(), Y, ts, lambda i, like: torch.randn_like(like), diffusion_scale=0.0)
    torch.testing.assert_close(a, sample_euler(toy_velocity, X0.clone(), Y, ts))


def test_last_step_grid():
    ts = get_timesteps_uniform(10, last_step=0.04)
    assert len(ts) == 11 and ts[-1] == 1 and abs(ts[-2].item() - 0.96) < 1e-12
    torch.testing.assert_close(ts[1] - ts[0], torch.tensor(0.96 / 9, dtype=torch.float64))


def test_noise_depends_only_on_seed_and_index():
    a = noise_for_indices([5, 6, 7], (2, 3), seed=11)
    b = noise_for_indices([7, 5], (2, 3), seed=11)
    torch.testing.assert_close(a[2], b[0])
    torch.testing.assert_close(a[0], b[1])
    assert not torch.equal(a[0], noise_for_indices([5], (2, 3), seed=12)[0])
    s1 = StepNoise([3, 4], seed=1)(0, torch.zeros(2, 5))
    s2 = StepNoise([4], seed=1)(0, torch.zeros(1, 5))
    torch.testing.assert_close(s1[1], s2[0])


def test_cfg_wrapper_batches_once_and_combines():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        return x * 0 + (y.view(-1, 1) == 10).to(x.dtype) * 2.0 + (y.view(-1, 1) != 10).to(x.dtype) * 3.0

    fn = cfg_wrapper(model, scale=4.0, null_class=10)
    x = torch.zeros(3, 1)
    out = fn(x, torch.full((3,), 0.5), torch.tensor([1, 2, 3]))
    assert len(calls) == 1 and calls[0].tolist() == [10, 10, 10, 1, 2, 3]
    torch.testing.assert_close(out, torch.full((3, 1), 2.0 + 4.0 * (3.0 - 2.0)))
    fn = cfg_wrapper(model, scale=4.0, null_class=10, interval=(0.2, 0.4))
    out = fn(x, torch.full((3,), 0.5), torch.tensor([1, 2, 3]))
    assert len(calls[-1]) == 3 and out.eq(3.0).all()      # outside the interval: one conditional pass


def test_dispatcher_runs_every_solver():
    for solver in ("euler", "heun", "ab2", "ab4", "dopri5", "euler_maruyama"):
        cfg = SamplerConfig(solver=solver, steps=64, last_step=None)
        x = sample(toy_velocity, X0.clone(), Y, cfg, noise=StepNoise(range(11), 0))
        tol = 0.3 if solver == "euler_maruyama" else 0.05
        assert (x - exact_endpoint(X0)).abs().max() < (tol if solver != "euler_maruyama" else 3.0)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(toy_velocity, X0, Y, SamplerConfig(solver="rk45"))
