"""FSDP2 on CPU (gloo): sharded init, agreement with DDP, and resume from 2 processes onto 1 (DCP resharding)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer_runs import REPO, assert_close_logs, env, train


@pytest.mark.parametrize("precision", ["bf16"])   # mixed-precision policy + activation checkpointing
def test_sharded_init_equals_unsharded_init(precision):
    """meta → fully_shard → to_empty → init: the gathered weights equal an unsharded build with the same seed."""
    script = os.path.join(REPO, "tests", "trainer", "fsdp_init_main.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                        precision], cwd=REPO, env=env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "FSDP-INIT-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


@pytest.mark.cuda
def test_sharded_init_optimizer_and_norm_on_two_gpus():
    """The same worker on two GPUs (nccl): CUDA MSDCN kernels, fused AdamW on CUDA on the local shards equal to torch's
    DTensor step bitwise, the local-shard grad norm, which units reshard, no view-output warning."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    script = os.path.join(REPO, "tests", "trainer", "fsdp_init_main.py")
    e = dict(env(), DS_ACCELERATOR="cuda")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                        "bf16"], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "FSDP-INIT-OK" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


def test_fsdp_agrees_with_ddp_and_resumes_on_fewer_processes(ddp2_reference, tmp_path):
    """2-process FSDP to nimg 24 (checkpoint), then 1 process resumes from the DCP checkpoint to 48.

    The 2-process part shards both blocks of the debug model as one unit (strategy.blocks_per_unit=2), the resume
    one block per unit: the grouping changes neither the math nor the checkpoint layout.

    Every logged loss must match 2-process DDP within float tolerance (only reduction order differs), and the
    consolidated EMA export must match DDP's.
    """
    d = str(tmp_path / "fsdp")
    train(d, ["strategy.name=fsdp", "strategy.blocks_per_unit=2", "train.total_nimg=24"], nproc=2)
    p = train(d, ["strategy.name=fsdp", "strategy.blocks_per_unit=1"], nproc=0)
    assert "saved by 2 process(es), now 1" in p.stdout
    assert_close_logs(d, ddp2_reference, rtol=2e-5)
    import torch
    from safetensors.torch import load_file

    ck = os.path.join("checkpoints", "nimg_000000000048")
    for name in ("ema.safetensors", "model.safetensors"):
        ea, eb = load_file(os.path.join(d, ck, name)), load_file(os.path.join(ddp2_reference, ck, name))
        assert sorted(ea) == sorted(eb)
        for k in eb:
            torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5)
    meta = json.load(open(os.path.join(d, ck, "meta.json")))
    assert meta["strategy"] == "fsdp" and meta["world_size"] == 1
    assert os.path.isdir(os.path.join(d, "checkpoints", "nimg_000000000024", "dcp"))
