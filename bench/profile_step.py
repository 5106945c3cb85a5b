"""Where a training step's time goes: GPU kernel time by category, GPU busy fraction, top kernels.

Profiles the same step as bench/train_step.py (flow loss, backward, grad norm, AdamW, EMA) with
torch.profiler and answers two questions before anyone optimises: is the step GPU-bound or
launch-bound (busy fraction = union of kernel intervals / wall time), and which kernels dominate.

    python bench/profile_step.py --models FlowDCN-XL/2 SiT-XL/2 --res 256 --compile off,on --out $OUT/profile.json

Prints one category table per (model, compile) and the top kernels; writes everything as JSON.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import os
import platform
import pstats
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_step import build_step, model_overrides  # noqa: E402  (the same step as the throughput benchmark)
from trainer import dist  # noqa: E402
from trainer.config import ScheduleConfig, StrategyConfig  # noqa: E402

# Kernel name -> category; first match wins (order matters: "msdcn" before the generic patterns).
CATEGORIES = [
    ("msdcn", r"msdcn"),
    ("attention (sdpa)", r"flash|fmha|attention|sdpa|cudnn.*(sdpa|mha)"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|ampere_.*(s|h)\d+|xmma"),
    ("optimizer/ema", r"multi_tensor|foreach|adam|lerp"),
    ("triton (compiled)", r"^triton_"),
    ("reduction/norm", r"reduce|norm|welford|softmax"),
    ("copy/cast", r"copy|cast|to_copy|convert|cat|fill|memset|Memcpy|Memset"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise"),
]


def category(name: str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def busy_time_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams may overlap)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def python_hotspots(step, steps: int, top: int) -> dict:
    """Where the host's Python time goes: cProfile over ``steps`` steps, functions by self time (ms per step).

    The torch profiler's host table shows ops and runtime calls; this shows the Python around them (compiled
    graph wrappers, hooks, op wrappers), which is what a host-bound step is made of. cProfile slows Python
    down, so read the shares, not the absolute times."""
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    st = pstats.Stats(prof)
    rows = []
    for (path, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
        short = "/".join(path.split("/")[-2:])
        rows.append({"function": f"{short}:{line}({fn})", "self_ms_per_step": tt * 1e3 / steps,
                     "cum_ms_per_step": ct * 1e3 / steps, "calls_per_step": nc / steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    total = sum(r["self_ms_per_step"] for r in rows)
    return {"wall_ms_per_step_cprofile": wall, "python_self_ms_per_step": total, "top": rows[:top]}


def profile_one(name: str, res: int, batch: int, compile_: bool, args) -> dict:
    sched = ScheduleConfig(global_batch=batch * dist.get_world_size(), precision=args.precision, compile=compile_,
                           compile_mode=args.compile_mode)
    strategy, step = build_step(name, res // 8, batch, sched,
                                StrategyConfig(name=args.strategy, blocks_per_unit=args.blocks_per_unit,
                                               reshard_after_forward=args.reshard == "on"),
                                model_overrides(name, args))

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    # Device-side events minus user annotations (e.g. "Optimizer.step#AdamW.step", "FSDP::pre_forward"): those are
    # ranges on the GPU timeline that contain kernels and gaps, not work of their own.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    by_name: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for e in kernels:
        by_name[e.name] += e.device_time_total
        counts[e.name] += 1
    by_cat: dict[str, float] = collections.defaultdict(float)
    for n, us in by_name.items():
        by_cat[category(n)] += us
    # Host side: the ops and CUDA runtime calls that hold the CPU (syncs show up as cudaStreamSynchronize etc.).
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    busy = busy_time_us([(e.time_range.start, e.time_range.end) for e in kernels])
    n_launch = len(kernels)
    py = python_hotspots(step, args.steps, args.top) if args.python else None
    strategy.close()
    del strategy, step
    torch.cuda.empty_cache()
    per = 1.0 / args.steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[: args.top]
    return {
        "model": name, "res": res, "batch": batch, "compile": compile_, "strategy": args.strategy,
        "blocks_per_unit": args.blocks_per_unit if args.strategy == "fsdp" else None,
        "reshard_after_forward": args.reshard == "on" if args.strategy == "fsdp" else None,
        "wall_ms_per_step": wall_us * per / 1e3, "gpu_busy_ms_per_step": busy * per / 1e3,
        "busy_fraction": busy / wall_us, "kernels_per_step": n_launch * per,
        "category_ms_per_step": {k: v * per / 1e3 for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "ms_per_step": us * per / 1e3, "calls_per_step": counts[n] * per,
                         "category": category(n)} for n, us in top],
        "top_host": [{"name": e.key[:160], "self_cpu_ms_per_step": e.self_cpu_time_total * per / 1e3,
                      "calls_per_step": e.count * per} for e in host[: args.top]],
        "python": py,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["FlowDCN-XL/2", "SiT-XL/2"])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--compile", default="off", help="comma list of off/on")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode for compile=on (reduce-overhead = CUDA graphs)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="fsdp: run under torchrun")
    ap.add_argument("--reshard", choices=["on", "off"], default="on" if StrategyConfig.reshard_after_forward else "off",
                    help="fsdp: free the unsharded blocks after forward (on) or keep them for backward (off)")
    ap.add_argument("--blocks-per-unit", type=int, default=StrategyConfig.blocks_per_unit,
                    help="fsdp: blocks per FSDP unit")
    ap.add_argument("--msdcn-impl", default="auto", choices=["auto", "torch", "cuda"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--python", action="store_true", help="also cProfile the steps: Python functions by self time")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py profiles CUDA kernels: it needs a GPU")
    rows = []
    for name in args.models:
        for c in args.compile.split(","):
            r = profile_one(name, args.res, args.batch, c == "on", args)
            rows.append(r)
            who = f" (rank {dist.get_rank()} of {dist.get_world_size()})" if dist.get_world_size() > 1 else ""
            print(f"\n== {name} {args.res}px batch {args.batch} compile={c}{who}: wall {r['wall_ms_per_step']:.1f} ms/step, "
                  f"GPU busy {r['gpu_busy_ms_per_step']:.1f} ms ({100 * r['busy_fraction']:.0f}%), "
                  f"{r['kernels_per_step']:.0f} kernels/step")
            for cat, ms in r["category_ms_per_step"].items():
                print(f"   {cat:22} {ms:8.2f} ms")
            print("   top kernels (ms/step, calls/step):")
            for k in r["top_kernels"]:
                print(f"   {k['ms_per_step']:8.2f} {k['calls_per_step']:6.0f}  {k['name'][:110]}")
            print("   top host ops by self CPU time (ms/step, calls/step):")
            for k in r["top_host"]:
                print(f"   {k['self_cpu_ms_per_step']:8.2f} {k['calls_per_step']:6.0f}  {k['name'][:110]}")
            if r["python"]:
                py = r["python"]
                print(f"   Python under cProfile: {py['wall_ms_per_step_cprofile']:.1f} ms/step wall, "
                      f"{py['python_self_ms_per_step']:.1f} ms/step self time in Python functions; top (self, cum ms/step, calls):")
                for k in py["top"]:
                    print(f"   {k['self_ms_per_step']:8.2f} {k['cum_ms_per_step']:8.2f} {k['calls_per_step']:6.0f}  {k['function'][:100]}")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
            "rank": dist.get_rank(), "world": dist.get_world_size(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    if args.out:
        # Every rank profiles its own view (under FSDP one rank may wait in collectives for another's host); each
        # writes its own file: rank 0 to --out, rank r to <out>.rank<r>.json.
        out = args.out if dist.get_rank() == 0 else f"{os.path.splitext(args.out)[0]}.rank{dist.get_rank()}.json"
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
