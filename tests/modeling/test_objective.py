"""Flow-matching objective: interpolant, target, t samplers, label dropout, reproducible draws."""
import torch

from modeling.objective import FlowMatchingConfig, FlowMatchingLoss, sample_t


def test_loss_equals_closed_form_for_a_linear_net():
    # A net that returns x_t exactly: loss = mean((t·x + (1−t)ε − (x − ε))²), computed independently.
    cfg = FlowMatchingConfig(label_dropout=0.0)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    seen = {}

    def net(xt, t, yy):
        seen["t"], seen["xt"] = t, xt
        return xt

    loss = FlowMatchingLoss(cfg, null_class=10)(net, x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.rand(5, generator=g, dtype=torch.float32)
    eps = torch.randn(x.shape, generator=g)
    tb = t.double().view(5, 1, 1, 1)
    xt = tb * x + (1 - tb) * eps.double()
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(loss, (xt - (x - eps.double())).pow(2).flatten(1).mean(1).float())


def test_label_dropout_rate_and_null_class():
    cfg = FlowMatchingConfig(label_dropout=0.1)
    labels = {}

    def net(xt, t, y):
        labels["y"] = y
        return xt

    FlowMatchingLoss(cfg, null_class=1000)(net, torch.zeros(20000, 1, 1, 1), torch.full((20000,), 7), torch.Generator().manual_seed(1))
    frac = (labels["y"] == 1000).float().mean().item()
    assert 0.09 < frac < 0.11 and set(labels["y"].unique().tolist()) == {7, 1000}


def test_logit_normal_t_matches_its_moments():
    t = sample_t(200_000, FlowMatchingConfig(t_sampler="logit_normal", logit_mean=0.5, logit_std=0.8), torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    u = sample_t(200_000, FlowMatchingConfig(), torch.Generator().manual_seed(0))
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
