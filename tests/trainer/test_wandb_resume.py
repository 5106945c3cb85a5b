"""wandb (offline) continues the same run id across a restart: the id travels in every checkpoint's meta.json."""
import glob
import json
import os

from trainer_runs import train


def test_wandb_offline_same_id_across_restarts(tmp_path):
    d = str(tmp_path / "wb")
    common = ["logging.wandb=true", "train.checkpoint_every_nimg=8"]
    train(d, common + ["train.total_nimg=16"])
    train(d, common + ["train.total_nimg=24"])
    ids = {json.load(open(m))["wandb_id"] for m in glob.glob(os.path.join(d, "checkpoints", "*", "meta.json"))}
    assert len(ids) == 1
    (run_id,) = ids
    runs = sorted(glob.glob(os.path.join(d, "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs
