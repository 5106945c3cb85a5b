"""Encoding job: images -> preprocessing -> VAE posterior moments -> bucketed shards + manifest.json.

    python -m data_pipeline.encode --source imagefolder --input /data/imagenet/train --out /data/in256 \
        --vae /models/sd-vae-ft-ema --format wds --preprocess center_crop --resolution 256
    torchrun --nproc_per_node 8 -m data_pipeline.encode ...   # ranks split the work; Slurm array tasks too

Work is cut into *units* of ``--unit-size`` consecutive images (in the source's sorted order). Unit ``u`` belongs to
worker ``u % (num_tasks * world_size)`` where worker = task_id * world_size + rank, so ranks and array tasks never
collide. A unit writes one shard per bucket it touches (``u000123-b004.tar``), each atomically, then records itself
as done in ``_progress/unit-000123.json``; a re-run skips done units and finishes the rest. The worker that sees every
unit done writes ``manifest.json`` (atomic; identical content whoever writes it).

Bad images: every unreadable/undecodable image is reported with its path and counted. Without
``--allow-failures`` a unit with a failure is NOT marked done (its other images are encoded and written, so nothing
is lost but the unit is redone on the next run), the job finishes every other unit and exits with status 1 listing
the files; fix or delete them and re-run. With ``--allow-failures`` the unit is marked done and the failures are
listed in the manifest (``failures``, ``counts.failed``); the exit status is then 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import numpy as np
import torch

from data_pipeline.preprocess import PreprocessConfig, Preprocessor, to_tensor
from data_pipeline.shards import FORMATS, write_json_atomic, write_mds_root_index, write_shard
from data_pipeline.sources import ImageError, build_source
from data_pipeline.vae import build_vae

MANIFEST = "manifest.json"
PROGRESS_DIR = "_progress"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["imagefolder", "tar"], default="imagefolder")
    p.add_argument("--input", nargs="+", required=True, help="ImageFolder root, or tar files / directories of tars")
    p.add_argument("--class-map", default=None, help="JSON {class: index} or text file, one class name per line")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--format", choices=FORMATS, default="wds")
    p.add_argument("--vae", default="identity", help="local AutoencoderKL directory, or 'identity' (pixel space)")
    p.add_argument("--vae-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu", help="cpu | cuda (uses cuda:LOCAL_RANK)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    p.add_argument("--workers", type=int, default=4, help="threads decoding and preprocessing images")
    p.add_argument("--unit-size", type=int, default=1000, help="images per resumable work unit")
    p.add_argument("--preprocess", choices=["center_crop", "fit_mixed"], default="center_crop")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ar-min", type=float, default=0.5)
    p.add_argument("--ar-max", type=float, default=3.0)
    p.add_argument("--num-ratios", type=int, default=10)
    p.add_argument("--no-square", action="store_true", help="fit_mixed: no extra square bucket")
    p.add_argument("--seed", type=int, default=0, help="fit_mixed: per-image resize/crop choice")
    p.add_argument("--no-flip", action="store_true", help="do not encode horizontal flips")
    p.add_argument("--allow-failures", action="store_true", help="record bad images in the manifest and exit 0")
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    p.add_argument("--task-id", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
                   - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)))
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def preprocess_config(args) -> PreprocessConfig:
    """The PreprocessConfig the CLI options describe."""
    return PreprocessConfig(mode=args.preprocess, resolution=args.resolution, max_tokens=args.max_tokens,
                            ar_min=args.ar_min, ar_max=args.ar_max, num_ratios=args.num_ratios,
                            include_square=not args.no_square, seed=args.seed, flip=not args.no_flip)


def load_item(source, pre: Preprocessor, item, key: str):
    """Decode + preprocess one image: (bucket, (PIL image, [src_h, src_w]), op, None) or (None, None, None, failure)."""
    try:
        src = source.load(item)
        b, img, op = pre(src, key=key)
        return b, (img, [src.size[1], src.size[0]]), op, None  # uint8 PIL until batched: 4x less memory than fp32
    except ImageError as e:
        return None, None, None, {"path": e.path, "error": e.reason}
    except Exception as e:  # noqa: BLE001 - a preprocessing failure is also reported with its file
        return None, None, None, {"path": item.name, "error": f"{type(e).__name__}: {e}"}


def submit_unit(unit: int, items, source, pre: Preprocessor, args, pool) -> list:
    """Start decoding one unit's images on the thread pool (overlaps with the VAE work of the previous unit)."""
    first = unit * args.unit_size
    return [pool.submit(load_item, source, pre, it, f"{first + j:09d}") for j, it in enumerate(items)]


def encode_unit(unit: int, items, loaded: list, vae, args) -> Dict:
    """VAE-encode one unit's decoded images; write its shards; return its progress record."""
    first = unit * args.unit_size
    by_bucket: Dict[int, list] = defaultdict(list)
    failures = []
    for j, fut in enumerate(loaded):
        b, x, op, err = fut.result()
        if err:
            failures.append(err)
            print(f"[encode] bad image: {err['path']}: {err['error']}", file=sys.stderr, flush=True)
        else:
            by_bucket[b].append((j, x, op))
    shards, per_class = [], Counter()
    for b in sorted(by_bucket):
        recs = []
        group = by_bucket[b]
        for s in range(0, len(group), args.batch_size):
            chunk = group[s: s + args.batch_size]
            x = torch.stack([to_tensor(c[1][0]) for c in chunk])  # (N, 3, H, W) in [-1, 1]
            if not args.no_flip:  # image and its horizontal flip in one VAE call
                mean, logvar = vae.encode_moments(torch.cat([x, torch.flip(x, dims=[-1])]))  # (2N, C, h, w)
                parts = [mean[: len(x)], logvar[: len(x)], mean[len(x):], logvar[len(x):]]
            else:
                parts = list(vae.encode_moments(x))  # (N, C, h, w) each
            moments = torch.stack(parts, dim=1).cpu().numpy().astype(np.float16)  # (N, K, C, h, w)
            for (j, xi, op), m in zip(chunk, moments):
                item = items[j]
                if not np.isfinite(m).all():  # fp16 overflow or a NaN from the VAE: report, never store
                    failures.append({"path": item.name, "error": "non-finite VAE moments in fp16"})
                    print(f"[encode] bad image: {item.name}: non-finite VAE moments in fp16", file=sys.stderr)
                    continue
                recs.append({"key": f"{first + j:09d}", "label": item.label, "moments": m,
                             "meta": {"src": item.name, "src_hw": xi[1],
                                      "hw": list(m.shape[-2:]), "bucket": b, "op": op}})
                per_class[item.label] += 1
        if recs:
            entry = write_shard(args.out, f"u{unit:06d}-b{b:03d}", recs, args.format)
            shards.append({**entry, "bucket": b, "unit": unit})
    return {"unit": unit, "first": first, "num_items": len(items), "shards": shards, "failures": failures,
            "per_class": {str(k): v for k, v in sorted(per_class.items())}}


def build_manifest(args, source, pre: Preprocessor, vae, records: List[Dict]) -> Dict:
    """Merge every unit's progress record into the dataset manifest."""
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: s["path"])
    per_bucket, per_class = Counter(), Counter()
    for s in shards:
        per_bucket[s["bucket"]] += s["count"]
    for r in records:
        per_class.update({int(k): v for k, v in r["per_class"].items()})
    failures = [f for r in records for f in r["failures"]]
    ds = vae.downsample
    return {
        "version": 1,
        "format": args.format,
        "record_schema": {"key": "str", "label": "int", "moments": "float16 [K,C,h,w] (.npy)", "meta": "json"},
        "vae": {"id": vae.vae_id, "scale_factor": vae.scale_factor, "latent_channels": vae.latent_channels,
                "downsample": ds, "dtype": args.vae_dtype},
        "moments": ["mean", "logvar"] + ([] if args.no_flip else ["flip_mean", "flip_logvar"]),
        "preprocess": dataclasses.asdict(pre.cfg),
        "buckets": [{"id": i, "width": w, "height": h, "latent_hw": [h // ds, w // ds]}
                    for i, (w, h) in enumerate(pre.table)],
        "source": {"kind": source.kind, "inputs": [os.path.abspath(p) for p in args.input],
                   "num_images": len(source.items), "num_classes": source.num_classes,
                   "class_to_idx": source.class_to_idx, "ignored": source.ignored},
        "counts": {"images": sum(per_bucket.values()), "failed": len(failures),
                   "per_bucket": {str(k): v for k, v in sorted(per_bucket.items())},
                   "per_class": {str(k): v for k, v in sorted(per_class.items())}},
        "failures": failures,
        "units": {"size": args.unit_size, "count": len(records)},
        "shards": shards,
    }


def main(argv=None) -> int:
    """Encode this worker's units; write the manifest when every unit is done. Returns the exit status."""
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    worker, num_workers = args.task_id * world + rank, args.num_tasks * world
    if not 0 <= args.task_id < args.num_tasks:
        raise ValueError(f"--task-id {args.task_id} outside [0, {args.num_tasks})")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)  # on a shared CPU node, 1 thread avoids OpenMP spin contention
    device = args.device
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    os.makedirs(os.path.join(args.out, PROGRESS_DIR), exist_ok=True)

    source = build_source(args.source, args.input, args.class_map)
    pre = Preprocessor(preprocess_config(args))
    vae = build_vae(args.vae, dtype=torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32, device=device)
    items = source.items
    num_units = (len(items) + args.unit_size - 1) // args.unit_size
    if num_units == 0:
        raise ValueError(f"no images found in {args.input} (ignored: {source.ignored[:5]})")
    prog = lambda u: os.path.join(args.out, PROGRESS_DIR, f"unit-{u:06d}.json")  # noqa: E731
    # Temp files of this worker's units left by a killed run (other workers' may be in flight: leave those).
    for f in os.listdir(args.out):
        if f.startswith(".tmp-u") and f[6:12].isdigit() and int(f[6:12]) % num_workers == worker:
            p = os.path.join(args.out, f)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    mine = [u for u in range(worker, num_units, num_workers) if not os.path.exists(prog(u))]
    todo_images = sum(min(args.unit_size, len(items) - u * args.unit_size) for u in mine)
    print(f"[encode] worker {worker}/{num_workers}: {len(mine)} units ({todo_images} images) to do of {num_units}; "
          f"{len(pre.table)} bucket(s); vae={vae.vae_id} format={args.format}", flush=True)

    from tqdm import tqdm

    bad = []
    t0 = time.time()
    bar = tqdm(total=todo_images, unit="img", disable=args.no_progress or None, desc=f"encode[{worker}]")
    unit_items = lambda u: items[u * args.unit_size: (u + 1) * args.unit_size]  # noqa: E731
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        pending = submit_unit(mine[0], unit_items(mine[0]), source, pre, args, pool) if mine else []
        for n, u in enumerate(mine):
            loaded = pending
            if n + 1 < len(mine):  # decode the next unit while this one is on the VAE
                pending = submit_unit(mine[n + 1], unit_items(mine[n + 1]), source, pre, args, pool)
            rec = encode_unit(u, unit_items(u), loaded, vae, args)
            if rec["failures"] and not args.allow_failures:
                bad += rec["failures"]
            else:
                write_json_atomic(prog(u), rec)
            bar.update(len(loaded))
    bar.close()
    dt = time.time() - t0
    print(f"[encode] worker {worker}: {todo_images} images in {dt:.1f}s ({todo_images / max(dt, 1e-9):.1f} img/s)",
          flush=True)

    if all(os.path.exists(prog(u)) for u in range(num_units)):
        records = []
        for u in range(num_units):
            with open(prog(u)) as f:
                records.append(json.load(f))
        manifest = build_manifest(args, source, pre, vae, records)
        if args.format == "mds":
            write_mds_root_index(args.out, [s["path"] for s in manifest["shards"]])
        write_json_atomic(os.path.join(args.out, MANIFEST), manifest)
        print(f"[encode] manifest: {manifest['counts']['images']} images, {len(manifest['shards'])} shards, "
              f"{manifest['counts']['failed']} failed -> {os.path.join(args.out, MANIFEST)}", flush=True)
    if bad:
        print(f"[encode] {len(bad)} image(s) could not be encoded (units left undone; fix/remove and re-run, "
              "or pass --allow-failures):", file=sys.stderr)
        for f in bad:
            print(f"  {f['path']}: {f['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
