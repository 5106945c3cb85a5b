"""init_from (the next stage): full weights + EMA enter every strategy's layout and come back out unchanged."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from trainer_runs import train

CK0 = os.path.join("checkpoints", "nimg_000000000000")


@pytest.fixture(scope="module")
def source(ddp2_reference) -> str:
    return os.path.join(ddp2_reference, "checkpoints", "nimg_000000000024")


@pytest.mark.parametrize("strategy,nproc", [("fsdp", 2), ("zero2", 2), ("zero3", 2)])   # ddp: tests/stages
def test_init_from_roundtrip(source, tmp_path, strategy, nproc):
    """total_nimg=0: the run only loads and saves; its exports must equal the source's (model and EMA differ)."""
    d = str(tmp_path / strategy)
    train(d, [f"strategy.name={strategy}", "train.total_nimg=0", f"init_from={source}"], nproc=nproc)
    for name in ("model.safetensors", "ema.safetensors"):
        got, want = load_file(os.path.join(d, CK0, name)), load_file(os.path.join(source, name))
        assert sorted(got) == sorted(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), (name, k)
    src_model, src_ema = load_file(os.path.join(source, "model.safetensors")), load_file(os.path.join(source, "ema.safetensors"))
    assert any(not torch.equal(src_model[k], src_ema[k]) for k in src_ema)   # the test can tell them apart
