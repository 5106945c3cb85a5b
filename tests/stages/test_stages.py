"""trainer.stages without Slurm: chained stages, skip-when-done, exact mid-stage resume, refusals, status, configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from trainer import stages

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["experiment=tiny", "train.checkpoint_every_nimg=64", "train.log_every_nimg=32"]


def runner(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m trainer.stages ARGS`` in a fresh process (the trainer sets process-wide torch flags)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "trainer.stages", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def ckpt(root, stage: str, nimg: int) -> str:
    return os.path.join(str(root), stage, "checkpoints", f"nimg_{nimg:012d}")


def assert_same_tensors(a: str, b: str) -> None:
    ta, tb = load_file(a), load_file(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """pretrain_256 (128 images, 8x8) -> finetune_512 at a new resolution (16x16) stopped at 0 images, so its first
    checkpoint holds exactly the weights it was initialised with."""
    root = tmp_path_factory.mktemp("chain")
    args = ["run", f"root={root}", "only=pretrain_256,finetune_512", *TINY, "train.total_nimg=128",
            "finetune_512.train.total_nimg=0", "finetune_512.data.digits.resolution=16"]
    out = ok(runner(*args))
    return root, args, out


def test_second_stage_starts_from_first_stage_final_weights_and_ema(chained):
    root, _, out = chained
    final = ckpt(root, "pretrain_256", 128)
    assert json.load(open(os.path.join(root, "pretrain_256", "DONE.json")))["checkpoint"] == final
    assert f"[init] weights and EMA from {final}" in out
    first = ckpt(root, "finetune_512", 0)
    assert_same_tensors(os.path.join(final, "model.safetensors"), os.path.join(first, "model.safetensors"))
    assert_same_tensors(os.path.join(final, "ema.safetensors"), os.path.join(first, "ema.safetensors"))
    # the new stage's EMA is not a copy of its raw weights: both were carried over separately
    ema, raw = load_file(os.path.join(first, "ema.safetensors")), load_file(os.path.join(first, "model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_new_stage_gets_fresh_data_position_and_its_own_resolution(chained):
    root, _, _ = chained
    from data_pipeline.digits import DigitsConfig, DigitsSource

    saved = json.load(open(os.path.join(ckpt(root, "finetune_512", 0), "loader.json")))
    fresh = DigitsSource(DigitsConfig(global_batch=32, seed=0, resolution=16), 0, 1).state_dict()
    assert saved == json.loads(json.dumps(fresh))
    first_meta = json.load(open(os.path.join(ckpt(root, "pretrain_256", 128), "meta.json")))
    assert first_meta["config"]["data"]["digits"]["resolution"] == 8
    meta = json.load(open(os.path.join(ckpt(root, "finetune_512", 0), "meta.json")))
    assert meta["config"]["data"]["digits"]["resolution"] == 16
    assert meta["state"]["nimg"] == 0 and meta["state"]["step"] == 0      # fresh counters as well


def test_done_stages_are_skipped(chained):
    root, args, _ = chained
    done = [os.path.join(root, s, "DONE.json") for s in ("pretrain_256", "finetune_512")]
    before = [os.stat(p).st_mtime_ns for p in done]
    listing = sorted(os.listdir(os.path.join(root, "pretrain_256", "checkpoints")))
    out = ok(runner(*args))
    assert "pretrain_256: done, skipped" in out and "finetune_512: done, skipped" in out
    assert "[init]" not in out and "nimg=" not in out                     # nothing trained
    assert [os.stat(p).st_mtime_ns for p in done] == before
    assert sorted(os.listdir(os.path.join(root, "pretrain_256", "checkpoints"))) == listing


def test_status_reports_each_stage(chained, capsys):
    root, args, _ = chained
    status_args = ["status", f"root={root}", *[a for a in args[1:] if not a.startswith("only=")]]
    assert stages.main(status_args + ["format=json"]) == 0
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["pretrain_256", "finetune_512", "multiscale"]
    pre = rows["pretrain_256"]
    metrics = [json.loads(line) for line in open(os.path.join(root, "pretrain_256", "metrics.jsonl"))]
    assert (pre["nimg"], pre["planned"], pre["done"]) == (128, 128, True)
    assert pre["checkpoint"] == ckpt(root, "pretrain_256", 128)
    assert pre["last_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
    assert rows["finetune_512"]["done"] and rows["finetune_512"]["planned"] == 0
    assert (rows["multiscale"]["nimg"], rows["multiscale"]["done"], rows["multiscale"]["state"]) == (0, False, "not started")
    assert rows["multiscale"]["planned"] == 128
    assert stages.main(status_args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"pipeline root: {root}"
    assert table[1].split()[:2] == ["stage", "images"]
    line = next(t for t in table if t.startswith("pretrain_256"))
    assert "128 / 128" in line and "100.0" in line and "pretrain_256/checkpoints/nimg_000000000128" in line
    assert f"{pre['last_loss']:.4f}" in line and line.rstrip().endswith("done")
    assert next(t for t in table if t.startswith("multiscale")).rstrip().endswith("not started")
    # `final` (what slurm/eval_stage.sh evaluates): the finished stage's DONE.json checkpoint
    assert stages.main(["final", "only=pretrain_256", *status_args[1:]]) == 0
    assert capsys.readouterr().out.strip() == pre["checkpoint"]
    assert stages.main(["final", "only=multiscale", *status_args[1:]]) == 2
    assert "multiscale" in capsys.readouterr().err


def test_resume_mid_stage_is_bitwise_and_changed_data_is_refused(tmp_path):
    """96 images, then the same stage extended to 192 resumes from its checkpoint: equal to one 192-image run."""
    common = ["run", "only=pretrain_256", *TINY]
    ok(runner(*common, f"root={tmp_path / 'straight'}", "train.total_nimg=192"))
    part = f"root={tmp_path / 'resumed'}"
    ok(runner(*common, part, "train.total_nimg=96"))
    # Another resolution would make the saved loader position meaningless: refused before any work.
    bad = runner(*common, part, "train.total_nimg=192", "data.digits.resolution=16")
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "data.digits.resolution" in bad.stderr and ckpt(tmp_path / "resumed", "pretrain_256", 96) in bad.stderr
    out = ok(runner(*common, part, "train.total_nimg=192"))
    assert "pretrain_256: resuming" in out and "[resume]" in out and "nimg=96" in out
    for f in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(os.path.join(ckpt(tmp_path / "straight", "pretrain_256", 192), f),
                            os.path.join(ckpt(tmp_path / "resumed", "pretrain_256", 192), f))


def test_a_stage_needs_its_predecessor(tmp_path, capsys):
    code = stages.main(["run", f"root={tmp_path}", "only=finetune_512", "experiment=tiny"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pretrain_256" in err and os.path.join(str(tmp_path), "pretrain_256", "DONE.json") in err
    assert not os.path.exists(os.path.join(tmp_path, "finetune_512"))


def test_argument_routing():
    a = stages.parse_args(["status", "root=/r", "only=finetune_512", "experiment=tiny", "finetune_512.train.total_nimg=5",
                           "+multiscale.foo=1", "model=flowdcn_l2"])
    assert a.command == "status" and a.root == "/r" and a.only == ["finetune_512"]
    assert a.common == ["experiment=tiny", "model=flowdcn_l2"]
    assert a.per_stage == {"finetune_512": ["train.total_nimg=5"], "multiscale": ["+foo=1"]}
    with pytest.raises(SystemExit, match="root="):
        stages.parse_args(["run", "run_dir=/x"])
    with pytest.raises(SystemExit, match="unknown command"):
        stages.parse_args(["launch"])
    with pytest.raises(SystemExit, match="needs a key"):
        stages.parse_args(["run", "finetune_512=3"])
    assert stages.parse_args(["run", "check_data=false"]).check_data is False
    with pytest.raises(SystemExit, match="check_data"):
        stages.parse_args(["run", "check_data=no"])


def test_data_signature_ignores_io_knobs_only():
    """Workers/prefetch/pinning do not move the loader position; the shards, buckets and batch do."""
    base = {"data": {"kind": "latents", "latents": {"manifest": "/a/manifest.json", "buckets": [0, 1], "num_workers": 4,
                                                    "pin_memory": True}}, "train": {"global_batch": 256}}
    io = json.loads(json.dumps(base))
    io["data"]["latents"].update(num_workers=8, pin_memory=False, prefetch_factor=4)
    assert stages.data_signature(io) == stages.data_signature(base)
    assert base["data"]["latents"]["num_workers"] == 4                  # the caller's dict is left alone
    for key, value in (("buckets", [0]), ("manifest", "/b/manifest.json")):
        other = json.loads(json.dumps(base))
        other["data"]["latents"][key] = value
        assert stages.data_signature(other) != stages.data_signature(base), key
    other = json.loads(json.dumps(base))
    other["train"]["global_batch"] = 512
    assert stages.data_signature(other) != stages.data_signature(base)


def test_stage_configs_follow_the_official_recipe():
    """configs/stage/* against ../shared/reference/flowdcn.md §6; experiment=tiny shrinks every stage."""
    args = stages.parse_args(["status", "root=/nonexistent"])
    _, full = stages.resolve_stages(args)
    by = {s.name: s.cfg for s in full}
    assert [s.name for s in full] == ["pretrain_256", "finetune_512", "multiscale"]
    for name, cfg in by.items():
        assert cfg.model.name == "FlowDCN-XL/2", name
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_nimg, cfg.optim.grad_clip) == (1e-4, 0.0, 0, 0.0)
        assert (cfg.ema.decay, cfg.ema.warmup_steps, cfg.train.global_batch) == (0.9999, 0, 256)
        assert cfg.run_dir == os.path.join("/nonexistent", name) and cfg.init_from is None
    assert by["pretrain_256"].train.total_nimg == 2_000_000 * 256            # XL/2: 2M steps at 256
    assert by["finetune_512"].train.total_nimg == 100_000 * 256              # "XL 512² 100k"
    assert by["pretrain_256"].data.latents["manifest"].endswith("in256/manifest.json")
    assert by["finetune_512"].data.latents["manifest"].endswith("in512/manifest.json")
    assert by["multiscale"].data.latents["batch_policy"] == "tokens"
    args = stages.parse_args(["status", "root=/nonexistent", "experiment=tiny", "finetune_512.train.total_nimg=7"])
    _, tiny = stages.resolve_stages(args)
    for s in tiny:
        assert (s.cfg.model.name, s.cfg.data.kind, s.cfg.strategy.name) == ("FlowDCN-debug", "digits", "ddp"), s.name
    assert [s.cfg.train.total_nimg for s in tiny] == [512, 7, 512]


def test_command_line_group_choices_beat_stage_and_experiment_presets():
    """`strategy=zero2` (the Slurm scripts' documented example) and `model=...` must win over what a stage or an
    experiment preset picks: a preset that set `strategy.name` as a value silently turned zero2 back into fsdp."""
    def strategies(argv):
        _, st = stages.resolve_stages(stages.parse_args(["status", "root=/nonexistent", *argv]))
        return {s.name: (s.cfg.strategy.name, s.cfg.model.name) for s in st}
    assert set(strategies([]).values()) == {("fsdp", "FlowDCN-XL/2")}
    assert set(strategies(["strategy=zero2"]).values()) == {("zero2", "FlowDCN-XL/2")}
    assert set(strategies(["experiment=tiny"]).values()) == {("ddp", "FlowDCN-debug")}
    assert set(strategies(["experiment=tiny", "strategy=fsdp"]).values()) == {("fsdp", "FlowDCN-debug")}
    assert strategies(["pretrain_256.strategy=zero3"])["pretrain_256"][0] == "zero3"
    from hydra import compose, initialize_config_dir
    import trainer.train  # noqa: F401  (registers the train_schema)
    from modeling.registry import model_config
    with initialize_config_dir(config_dir=stages.config_dir(), version_base=None):
        for ov, want in [(["experiment=tiny_latents", "strategy=fsdp"], ("fsdp", "FlowDCN-debug")),
                         (["experiment=digits", "model=sit_debug", "~model.overrides.groups"], ("ddp", "SiT-debug")),
                         (["experiment=digits"], ("ddp", "FlowDCN-debug"))]:
            cfg = compose("train", overrides=ov)
            assert (cfg.strategy.name, cfg.model.name) == want, ov
            model_config(cfg.model.name, **cfg.model.overrides)   # the preset's overrides fit the chosen model


def test_two_ranks_chain_stages_in_one_process_group(tmp_path):
    """torchrun, 2 gloo ranks, both stages in one launch: the hand-over decision is rank 0's, broadcast."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer.stages",
           "run", f"root={tmp_path}", "only=pretrain_256,finetune_512", *TINY, "train.total_nimg=64",
           "finetune_512.train.total_nimg=0"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = ok(p)
    final = ckpt(tmp_path, "pretrain_256", 64)
    assert f"finetune_512: starting from pretrain_256's final weights + EMA {final}" in out
    assert json.load(open(os.path.join(final, "meta.json")))["world_size"] == 2
    for f in ("model.safetensors", "ema.safetensors"):
        assert_same_tensors(os.path.join(final, f), os.path.join(ckpt(tmp_path, "finetune_512", 0), f))
