"""DeepSpeed ZeRO-2/3 on CPU (gloo, client torch AdamW): agreement with DDP, same-world resume, clear refusals."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from trainer_runs import assert_close_logs, train


def assert_agrees_with(ref: str, d: str, rtol: float = 2e-5) -> None:
    assert_close_logs(d, ref, rtol)
    ck = os.path.join("checkpoints", "nimg_000000000048")
    for name in ("ema.safetensors", "model.safetensors"):
        ea, eb = load_file(os.path.join(d, ck, name)), load_file(os.path.join(ref, ck, name))
        assert sorted(ea) == sorted(eb), name
        for k in eb:
            torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5)


def test_zero2_agrees_with_ddp(ddp2_reference, tmp_path):
    d = str(tmp_path / "zero2")
    train(d, ["strategy.name=zero2"], nproc=2)
    assert_agrees_with(ddp2_reference, d)


def test_zero3_resume_agrees_with_ddp_and_refuses_other_world_size(ddp2_reference, tmp_path):
    """ZeRO-3 (sharded EMA) to nimg 24, resumed on 2 processes to 48; resuming on 1 process is a clear error."""
    d = str(tmp_path / "zero3")
    train(d, ["strategy.name=zero3", "train.total_nimg=24"], nproc=2)
    assert os.path.exists(os.path.join(d, "checkpoints", "nimg_000000000024", "ema_rank1.pt"))
    p = train(d, ["strategy.name=zero3", "train.total_nimg=32"], nproc=0, check=False)
    assert p.returncode != 0 and "ZeRO-3 checkpoint of 2 processes cannot resume as ZeRO-3 on 1" in p.stderr, p.stderr[-3000:]
    train(d, ["strategy.name=zero3"], nproc=2)
    assert_agrees_with(ddp2_reference, d)
