"""End-to-end DDP runs on CPU: 1 vs 2 processes, exact resume after kill -9 and after a signal, exit codes."""
from __future__ import annotations

import json
import os
import signal

import torch
from safetensors.torch import load_file

from trainer_runs import assert_close_logs, losses, train, train_until


def test_one_and_two_processes_agree(ddp2_reference, tmp_path):
    """Same global batch: per-sample noise is keyed by global position, so only float summation order differs."""
    one = str(tmp_path / "one")
    train(one)
    assert sorted(losses(one)) == list(range(8, 49, 8))
    assert_close_logs(one, ddp2_reference, rtol=1e-5)
    ea = load_file(os.path.join(one, "checkpoints", "nimg_000000000048", "ema.safetensors"))
    eb = load_file(os.path.join(ddp2_reference, "checkpoints", "nimg_000000000048", "ema.safetensors"))
    for k in eb:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-4, atol=1e-5)
    grids = sorted(os.listdir(os.path.join(ddp2_reference, "samples")))   # train.snapshot_every_nimg=24
    assert grids == ["grid_000000000024.png", "grid_000000000048.png"]
    done = json.load(open(os.path.join(ddp2_reference, "DONE.json")))
    assert done["nimg"] == 48 and done["checkpoint"].endswith("nimg_000000000048")


def test_resume_after_kill9_is_bitwise(ddp2_reference, tmp_path):
    """kill -9 between checkpoints, re-run the same command: the losses equal the uninterrupted run's bit for bit."""
    d = str(tmp_path / "killed")
    # A long run killed after nimg 32 (checkpoint at 24, next at 48), resumed with the reference's end (the LR is
    # constant, so the end does not change the steps before it).
    rc, out = train_until(d, ["train.total_nimg=4000"], nproc=2, nimg=32, sig=signal.SIGKILL)
    assert rc != 0, out[-2000:]
    assert not os.path.exists(os.path.join(d, "DONE.json"))
    # A half-written checkpoint directory from the crash must be ignored, with a warning.
    os.makedirs(os.path.join(d, "checkpoints", ".tmp-nimg_000000000040"))
    p = train(d, nproc=2)
    assert "ignoring half-written checkpoint" in p.stderr
    assert "[resume]" in p.stdout
    assert_close_logs(d, ddp2_reference, rtol=0)


def test_signal_saves_checkpoint_and_resume_is_bitwise(ddp2_reference, tmp_path):
    """SIGUSR1 to torchrun (forwarded with --signals-to-handle): checkpoint at the step boundary, STOPPED.json."""
    d = str(tmp_path / "signalled")
    rc, out = train_until(d, ["train.total_nimg=4000"], nproc=2, nimg=16, sig=signal.SIGUSR1)
    assert rc != 0, out[-2000:]          # torchrun exits 1 whatever the workers return: hence STOPPED.json
    stopped = json.load(open(os.path.join(d, "STOPPED.json")))
    assert stopped["signal"] == "SIGUSR1" and stopped["exit_code"] == 3
    assert stopped["checkpoint"].endswith(f"nimg_{stopped['nimg']:012d}") and os.path.isdir(stopped["checkpoint"])
    assert 16 <= stopped["nimg"] < 48, f"the signal arrived too late to test anything:\n{out[-3000:]}"
    train(d, nproc=2)
    assert not os.path.exists(os.path.join(d, "STOPPED.json"))
    assert_close_logs(d, ddp2_reference, rtol=0)


def test_signal_exit_code_single_process(tmp_path):
    """A plain process (e.g. srun without torchrun) exits with signals.exit_code after saving."""
    d = str(tmp_path / "plain")
    rc, out = train_until(d, ["train.total_nimg=4000"], nproc=0, nimg=8, sig=signal.SIGTERM)
    assert rc == 3, out[-3000:]
    stopped = json.load(open(os.path.join(d, "STOPPED.json")))
    assert stopped["signal"] == "SIGTERM"
    assert os.path.exists(os.path.join(stopped["checkpoint"], "COMPLETE"))
