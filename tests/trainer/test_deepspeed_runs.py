"""DeepSpeed ZeRO-2/3 on CPU (gloo, client torch AdamW): agreement with DDP, resume on the same and on another world
size (DeepSpeed's universal checkpoint format), clear refusals."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from trainer_runs import assert_close_logs, losses, train


def assert_agrees_with(ref: str, d: str, rtol: float = 2e-5) -> None:
    assert_close_logs(d, ref, rtol)
    ck = os.path.join("checkpoints", "nimg_000000000048")
    for name in ("ema.safetensors", "model.safetensors"):
        ea, eb = load_file(os.path.join(d, ck, name)), load_file(os.path.join(ref, ck, name))
        assert sorted(ea) == sorted(eb), name
        for k in eb:
            torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_agrees_with_ddp(ddp2_reference, tmp_path, offload):
    """offload: the optimizer (DeepSpeed's CPU Adam, JIT-built on first use) and the fp32 masters, hence the EMA, on CPU."""
    d = str(tmp_path / "zero2")
    p = train(d, ["strategy.name=zero2", f"strategy.offload_optimizer={str(offload).lower()}"], nproc=2)
    assert f"optimizer={'DeepSpeedCPUAdam' if offload else 'AdamW'}" in p.stdout, p.stdout[-3000:]
    assert_agrees_with(ddp2_reference, d)


def test_zero2_resumes_on_one_process_through_the_universal_format(ddp2_reference, tmp_path):
    """ZeRO-2 on 2 processes to nimg 24, then 1 process to 48: the same losses and weights as 2-process DDP."""
    d = str(tmp_path / "zero2")
    train(d, ["strategy.name=zero2", "train.total_nimg=24"], nproc=2)
    p = train(d, ["strategy.name=zero2"], nproc=0)
    assert "saved by 2 process(es), now 1" in p.stdout
    assert os.path.isdir(os.path.join(d, "checkpoints", "nimg_000000000024", "deepspeed_universal"))
    assert_agrees_with(ddp2_reference, d)


def test_zero3_resume_on_the_same_and_other_world_sizes_agrees_with_ddp(ddp2_reference, tmp_path):
    """ZeRO-3 (sharded EMA) to nimg 24 on 2 processes, to 32 on 1 (universal format, EMA re-sharded from the
    consolidated export), to 48 on 2 again; resuming as another ZeRO stage is a clear error."""
    d = str(tmp_path / "zero3")
    train(d, ["strategy.name=zero3", "train.total_nimg=24"], nproc=2)
    assert os.path.exists(os.path.join(d, "checkpoints", "nimg_000000000024", "ema_rank1.pt"))
    p = train(d, ["strategy.name=zero2", "train.total_nimg=32"], nproc=2, check=False)
    assert p.returncode != 0 and "a ZeRO-3 checkpoint cannot resume as ZeRO-2" in p.stderr, p.stderr[-3000:]
    assert "resume with strategy=zero3" in p.stderr
    p = train(d, ["strategy.name=zero3", "train.total_nimg=32"], nproc=0)
    assert "saved by 2 process(es), now 1" in p.stdout
    p = train(d, ["strategy.name=zero3"], nproc=2)
    assert "saved by 1 process(es), now 2" in p.stdout
    assert_agrees_with(ddp2_reference, d)


def test_zero3_bf16_trains_close_to_fp32_ddp(ddp2_reference, tmp_path):
    """bf16 ZeRO-3 (bf16 parameters, the forward wrapped in bf16 autocast by autocast_inside, fp32 masters) follows the
    fp32 DDP run within bf16 rounding over the whole short run; the losses are not bitwise equal (bf16 is in use).
    On CPU DeepSpeed leaves the outer autocast on, so this checks that the wrapper composes with ZeRO-3's parameter
    hooks; the GPU case it exists for is in bench/gpu_train_session.sh e2e."""
    d = str(tmp_path / "zero3_bf16")
    p = train(d, ["strategy.name=zero3", "train.precision=bf16", "train.deterministic=false"], nproc=2)
    assert "precision=bf16" in p.stdout
    assert_close_logs(d, ddp2_reference, rtol=5e-2)
    a, b = losses(d), losses(ddp2_reference)
    assert any(a[n] != b[n] for n in b), "bf16 run is bitwise fp32: bf16 was not used"


def test_bf16_module_runs_under_autocast_even_when_the_engine_turns_it_off():
    """DeepSpeed's engine.forward wraps the module in `torch.autocast(enabled=False)` on GPUs (it only looks at CUDA
    autocast, so CPU runs never hit it) and its bf16 mode leaves fp32 inputs: autocast_inside re-enters bf16 autocast
    around the module's own forward, and leaves the caller's autocast state as it was, also when forward raises."""
    from trainer.parallel.deepspeed import autocast_inside

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 2, stride=2), torch.nn.Flatten(), torch.nn.Linear(8 * 4, 3))
    x = torch.randn(2, 4, 4, 4)
    want = net.to(torch.float64)(x.double())
    net = net.to(torch.bfloat16)
    with torch.autocast("cpu", enabled=False):           # what the engine does around the module
        try:
            net(x)
            raise AssertionError("a bf16 module took fp32 input without autocast: the test cannot fail")
        except RuntimeError as e:
            assert "type" in str(e)
        autocast_inside(net, "cpu")
        out = net(x)
        assert not torch.is_autocast_enabled("cpu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=0.05, atol=0.05)
    try:
        net(torch.randn(2, 5, 4, 4))                       # wrong channels: forward raises inside the hooks
    except RuntimeError:
        pass
    assert not torch.is_autocast_enabled("cpu")


def test_fused_adamw_steps_go_back_to_the_parameter_device():
    """DeepSpeed's universal loader restores AdamW's `step` on the CPU; fused CUDA AdamW refuses that ("state_steps is
    on cpu"), which broke every ZeRO resume on another GPU count. Parameters on `meta` stand in for the GPU here."""
    from trainer.parallel.deepspeed import steps_on_param_devices

    p, q = torch.nn.Parameter(torch.zeros(3, device="meta")), torch.nn.Parameter(torch.zeros(2, device="meta"))
    fused = torch.optim.AdamW([p], fused=True)
    plain = torch.optim.AdamW([q])
    for opt, param in ((fused, p), (plain, q)):
        opt.state[param]["step"] = torch.tensor(5.0, dtype=torch.float64)   # as the universal loader leaves it
    steps_on_param_devices(fused)
    steps_on_param_devices(plain)
    assert fused.state[p]["step"].device.type == "meta" and fused.state[p]["step"].dtype == torch.float32
    assert plain.state[q]["step"].device.type == "cpu"    # non-fused AdamW keeps its step on the CPU: left alone
