"""The loader under torchrun with 2 ranks (gloo): balance, disjointness, resume with 2 ranks and with 1 rank."""
import json
import os
import subprocess
import sys

import torch

from data_pipeline.loader import LoaderConfig, build_loader

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_two_ranks_balanced_disjoint_and_resumable_on_one_rank(tmp_path, latent_data):
    total, stop = 34, 13  # ~13 steps per epoch at a global batch of 4: crosses two epoch boundaries
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "dist_loader_main.py"), latent_data["wds"], str(tmp_path), str(total), str(stop)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for step in range(total):
        a, b = r0["full"][step], r1["full"][step]
        assert a["x"].shape == b["x"].shape and a["bucket"] == b["bucket"]  # one shape per step on all ranks
        assert not set(a["keys"]) & set(b["keys"])
    # Resumed with 2 ranks: exactly the uninterrupted batches.
    for r in (r0, r1):
        assert len(r["rest"]) == total - stop
        for a, b in zip(r["full"][stop:], r["rest"]):
            assert a["keys"] == b["keys"] and torch.equal(a["x"], b["x"])
    # Resumed with 1 rank and the same global batch (1 x 4 == 2 x 2): the two ranks' slices, concatenated.
    with open(tmp_path / "state.json") as f:
        state = json.load(f)
    assert state["samples_seen"] == stop * 4
    one = build_loader(LoaderConfig(manifest=latent_data["wds"], batch_size=4, num_workers=0, remainder="pad",
                                    seed=11), 0, 1)
    one.load_state_dict(state)
    got = []
    for batch in one:
        got.append(batch)
        if len(got) == total - stop:
            break
    for step, b in enumerate(got, start=stop):
        a0, a1 = r0["full"][step], r1["full"][step]
        assert b["keys"] == a0["keys"] + a1["keys"]
        assert torch.equal(b["x"], torch.cat([a0["x"], a1["x"]]))
