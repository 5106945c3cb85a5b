"""Checkpoint directories (incomplete ones ignored, pruning), corrupt files named, non-finite steps, run() twice."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal

import pytest

from data_pipeline.digits import DigitsConfig
from trainer.checkpoint import MARKER, CheckpointManager, load_weights
from trainer.config import (DataConfig, LoggingConfig, ModelConfig, OptimConfig, PreviewConfig, ScheduleConfig,
                            TrainConfig)
from trainer.loop import NonFiniteError
from trainer.train import run

OVR = {"in_channels": 1, "num_classes": 10, "hidden_size": 32, "depth": 2, "groups": 4}


def tiny(run_dir, total=16, lr=1e-3, on_nonfinite="stop", **sched) -> tuple[TrainConfig, dict]:
    cfg = TrainConfig(
        run_dir=str(run_dir), model=ModelConfig("FlowDCN-debug", dict(OVR)),
        data=DataConfig(digits=DigitsConfig(global_batch=8)), optim=OptimConfig(lr=lr),
        train=ScheduleConfig(total_nimg=total, global_batch=8, log_every_nimg=8, checkpoint_every_nimg=8,
                             keep_last=10, precision="fp32", on_nonfinite=on_nonfinite, **sched),
        preview=PreviewConfig(per_class=1, num_classes_shown=2), logging=LoggingConfig(progress=False))
    cfg.preview.sampler.steps = 2
    return cfg, dataclasses.asdict(cfg)


def digest(path) -> dict:
    return {f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest() for f in sorted(os.listdir(path))}


def test_manager_ignores_incomplete_and_prunes(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=2, keep_every_nimg=200)
    for n in (100, 200, 300, 400):
        os.makedirs(m.path(n))
        open(os.path.join(m.path(n), MARKER), "w").write(f"{n}\n")
    os.makedirs(m.path(500))                                   # renamed but never marked
    os.makedirs(os.path.join(m.root, ".tmp-nimg_000000000600"))   # crashed while writing
    with pytest.warns(UserWarning) as rec:
        assert m.latest() == m.path(400)
    text = " ".join(str(w.message) for w in rec)
    assert "nimg_000000000500" in text and ".tmp-nimg_000000000600" in text
    with pytest.warns(UserWarning):
        m.prune()
    assert sorted(os.listdir(m.root)) == ["nimg_000000000200", "nimg_000000000300", "nimg_000000000400",
                                          "nimg_000000000500"]   # 100 pruned; unmarked 500 left for a human


def test_resume_and_run_twice_in_one_process(tmp_path):
    """run() twice in one process: the second resumes at the end; the signal handlers are restored each time."""
    before = signal.getsignal(signal.SIGUSR1)
    assert run(*tiny(tmp_path / "r")) == 0
    assert signal.getsignal(signal.SIGUSR1) is before
    assert run(*tiny(tmp_path / "r", total=24)) == 0           # resumes from 16, trains one more step
    assert signal.getsignal(signal.SIGUSR1) is before
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == [f"nimg_{n:012d}" for n in (8, 16, 24)]


@pytest.mark.parametrize("victim,error,match", [
    ("train_state.pt", ValueError, "corrupt checkpoint file .*train_state.pt"),
    ("loader.json", ValueError, "corrupt checkpoint file .*loader.json"),
    ("meta.json", FileNotFoundError, "checkpoint file missing: .*meta.json"),
])
def test_corrupt_or_missing_file_names_itself(tmp_path, victim, error, match):
    cfg, d = tiny(tmp_path / "r")
    assert run(cfg, d) == 0
    f = tmp_path / "r" / "checkpoints" / "nimg_000000000016" / victim
    if error is FileNotFoundError:
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(error, match=match):
        run(*tiny(tmp_path / "r", total=24))


def test_corrupt_safetensors_names_itself(tmp_path):
    p = tmp_path / "ema.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="ema.safetensors"):
        load_weights(str(p))
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_weights(str(tmp_path / "nothing.safetensors"))


def test_nonfinite_stops_without_touching_the_last_checkpoint(tmp_path):
    """lr=1e30: the first step blows the weights up, a later step is not finite; the run stops with a clear error."""
    cfg, d = tiny(tmp_path / "r", total=64, lr=1e30)
    with pytest.raises(NonFiniteError, match="non-finite loss .* at nimg=") as e:
        run(cfg, d)
    ck = tmp_path / "r" / "checkpoints"
    done = sorted(os.listdir(ck))
    assert done, "expected at least the checkpoint after the first step"
    stop_nimg = int(str(e.value).split("nimg=")[1].split(";")[0])
    assert all(int(n[5:]) <= stop_nimg for n in done)
    last = ck / done[-1]
    snapshot = digest(last)
    assert not (tmp_path / "r" / "DONE.json").exists()
    with pytest.raises(NonFiniteError):            # re-running resumes from the last checkpoint and stops again
        run(*tiny(tmp_path / "r", total=64, lr=1e30))
    assert digest(last) == snapshot


def test_nonfinite_skip_keeps_going(tmp_path):
    cfg, d = tiny(tmp_path / "r", total=32, lr=1e30, on_nonfinite="skip")
    assert run(cfg, d) == 0
    import json

    done = json.load(open(tmp_path / "r" / "DONE.json"))
    assert done["nimg"] == 32 and done["skipped_steps"] >= 1


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """micro_batch=2 (4 micro-batches per step) = the whole batch at once, up to float summation order."""
    from trainer.logger import read_metrics

    run(*tiny(tmp_path / "whole", total=24))
    run(*tiny(tmp_path / "accum", total=24, micro_batch=2))
    a, b = read_metrics(str(tmp_path / "accum")), read_metrics(str(tmp_path / "whole"))
    assert [r["nimg"] for r in a] == [r["nimg"] for r in b] == [8, 16, 24]
    for ra, rb in zip(a, b):
        for k in ("loss", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * abs(rb[k]), (k, ra, rb)


def test_bad_compile_mode_is_refused_before_any_work():
    """Unknown torch.compile modes, CUDA graphs with accumulation, and CUDA graphs under FSDP2 fail in
    build_strategy, before a model is built, naming the setting."""
    from trainer.config import StrategyConfig
    from trainer.parallel import build_strategy
    from trainer.parallel.fsdp import apply_compile
    from modeling import build_model

    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        build_strategy(StrategyConfig(name="ddp"), ScheduleConfig(compile=True, compile_mode="fastest"), OptimConfig())
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        apply_compile(build_model("FlowDCN-debug", **OVR), "fastest")
    accumulate = ScheduleConfig(global_batch=8, micro_batch=4, compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="cannot accumulate gradients"):
        build_strategy(StrategyConfig(name="ddp"), accumulate, OptimConfig())
    sched = ScheduleConfig(compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="compile_mode=reduce-overhead uses CUDA graphs, which FSDP2"):
        build_strategy(StrategyConfig(name="fsdp"), sched, OptimConfig())
    build_strategy(StrategyConfig(name="ddp"), sched, OptimConfig())   # one process, no accumulation: allowed
