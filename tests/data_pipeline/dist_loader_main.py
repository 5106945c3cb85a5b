"""torchrun helper for test_loader_dist.py: 2 ranks (gloo) check balance/disjointness, save and resume loader state.

Writes ``<out>/rank<r>.pt`` with the uninterrupted run's and the resumed run's batches, and ``<out>/state.json``.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from data_pipeline.loader import LoaderConfig, build_loader


def take(loader, n):
    out = []
    for b in loader:
        out.append({"keys": b["keys"], "x": b["x"], "bucket": b["bucket"], "nimg_global": b["nimg_global"]})
        if len(out) == n:
            break
    return out


def main():
    manifest, out, total, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LoaderConfig(manifest=manifest, batch_size=2, num_workers=2, remainder="pad", seed=11)
    full = take(build_loader(cfg, rank, world), total)  # the uninterrupted run
    # Every step: same bucket and batch size on all ranks, disjoint keys, and every rank got the same number of steps.
    gathered = [None] * world
    dist.all_gather_object(gathered, [(b["bucket"], b["keys"]) for b in full])
    assert all(len(g) == total for g in gathered)
    for step in range(total):
        assert len({g[step][0] for g in gathered}) == 1, f"step {step}: ranks hold different buckets"
        keys = [k for g in gathered for k in g[step][1]]
        assert len(keys) == len(set(keys)) == full[step]["nimg_global"], f"step {step}: overlapping slices"
    # Stop after `stop` steps, save the state, resume on a fresh loader (as a new job would) for the rest.
    first = build_loader(cfg, rank, world)
    take(first, stop)
    state = first.state_dict()
    if rank == 0:
        with open(os.path.join(out, "state.json"), "w") as f:
            json.dump(state, f)
    resumed = build_loader(cfg, rank, world)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = take(resumed, total - stop)
    torch.save({"full": full, "rest": rest}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
