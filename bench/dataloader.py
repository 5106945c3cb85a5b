"""Loader throughput: samples/s from local latent shards (256-px images -> 4x32x32 latents) with N workers.

    python bench/dataloader.py --records 20000 --workers 0 1 2 --format wds mds --json bench/dataloader.json

Writes synthetic shards (random fp16 moments of image + flip, one bucket) in a temp dir, then times the real loader
(sampling, flips, scaling, per-rank batching) after a warm-up. Prints a table and writes JSON. Target (issue 4):
>= 5,000 samples/s per worker process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.loader import LoaderConfig, build_loader  # noqa: E402
from data_pipeline.shards import write_json_atomic, write_shard  # noqa: E402


def make_dataset(root: str, fmt: str, records: int, per_shard: int, hw: int = 32) -> str:
    """Synthetic latent shards + manifest under ``root``; returns the manifest path."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    shards = []
    for s in range(0, records, per_shard):
        n = min(per_shard, records - s)
        mom = rng.standard_normal((n, 4, 4, hw, hw), dtype=np.float32).astype(np.float16)
        mom[:, 1::2] = -4.0  # logvar
        recs = [{"key": f"{s + i:09d}", "label": int((s + i) % 1000), "moments": mom[i],
                 "meta": {"hw": [hw, hw], "bucket": 0}} for i in range(n)]
        shards.append({**write_shard(root, f"u{s // per_shard:06d}-b000", recs, fmt), "bucket": 0})
    manifest = {"version": 1, "format": fmt, "moments": ["mean", "logvar", "flip_mean", "flip_logvar"],
                "vae": {"id": "synthetic", "scale_factor": 0.18215, "latent_channels": 4, "downsample": 8},
                "buckets": [{"id": 0, "width": hw * 8, "height": hw * 8, "latent_hw": [hw, hw]}],
                "counts": {"images": records}, "shards": shards}
    path = os.path.join(root, "manifest.json")
    write_json_atomic(path, manifest)
    return path


def time_loader(manifest: str, workers: int, batch: int, seconds: float) -> dict:
    """Samples/s of one rank's loader after a warm-up of a few batches."""
    cfg = LoaderConfig(manifest=manifest, batch_size=batch, num_workers=workers, prefetch_factor=4, remainder="pad")
    loader = build_loader(cfg, 0, 1)
    it = iter(loader)
    for _ in range(max(2, 2 * workers)):  # warm-up: worker start, shard index scans, plan
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["x"].shape[0]
    dt = time.perf_counter() - t0
    del it
    return {"workers": workers, "batch": batch, "samples": n, "seconds": round(dt, 3), "samples_per_s": round(n / dt, 1),
            "per_worker": round(n / dt / max(workers, 1), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--format", nargs="+", default=["wds", "mds"])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir, removed after)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = args.dir or tempfile.mkdtemp(prefix="bench_loader_")
    rows = []
    try:
        for fmt in args.format:
            t0 = time.perf_counter()
            manifest = make_dataset(os.path.join(base, fmt), fmt, args.records, args.per_shard)
            write_s = time.perf_counter() - t0
            for w in args.workers:
                r = {"format": fmt, "write_s": round(write_s, 2), **time_loader(manifest, w, args.batch, args.seconds)}
                rows.append(r)
                print(f"{fmt:4s} workers={w} batch={args.batch}: {r['samples_per_s']:>9.0f} samples/s "
                      f"({r['per_worker']:.0f} per worker process)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    print("\n| format | workers | batch | samples/s | per worker |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['workers']} | {r['batch']} | {r['samples_per_s']:.0f} | {r['per_worker']:.0f} |")
    meta = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(sys.argv), "records": args.records, "latent": [4, 32, 32], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
