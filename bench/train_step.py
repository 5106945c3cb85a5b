"""Training-step throughput: images/s, tokens/s, MFU and peak memory of FlowDCN vs SiT, per resolution, ± compile.

One GPU (the default ``ddp`` strategy is the bare model in one process):
    python bench/train_step.py --out $OUT/train_step.json
FSDP scaling (run both, compare img/s):
    torchrun --standalone --nproc_per_node 1 bench/train_step.py --strategy fsdp --res 256 --out $OUT/fsdp1.json
    torchrun --standalone --nproc_per_node 2 bench/train_step.py --strategy fsdp --res 256 --out $OUT/fsdp2.json
CPU smoke test (what tests/trainer/test_bench_smoke.py runs):
    python bench/train_step.py --models FlowDCN-debug SiT-debug --res 32 --batch 2 --steps 2 --warmup 1 --device cpu \
        --compile off --out /tmp/t.json

A step is the trainer's real step: flow-matching loss (per-sample noise drawn on the device), backward,
grad norm, AdamW, EMA update; synthetic latents [B, 4, res/8, res/8] and random labels. The strategy
and the loss come from trainer/ (no Hydra), so this runs on the GPU machine's torch as is. Prints a
table and writes JSON (never asserts a speed).
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling import build_model  # noqa: E402
from trainer import dist  # noqa: E402
from trainer.config import OptimConfig, ScheduleConfig, StrategyConfig  # noqa: E402
from trainer.ema import EMA  # noqa: E402
from trainer.flops import peak_tflops, train_flops_per_image  # noqa: E402
from trainer.objective import StepNoise, flow_loss  # noqa: E402
from trainer.parallel import build_strategy  # noqa: E402

DEFAULT_BATCH = {256: 32, 512: 8, 1024: 2}   # per GPU; the anchors' batch at 256 and 512 px


def model_overrides(name: str, args) -> dict:
    """build_model overrides for a benchmarked model: ``--override key=value`` pairs (e.g. a deep, narrow model as
    a host-time proxy on CPU) and, for FlowDCN, the MSDCN implementation."""
    out = {}
    for kv in getattr(args, "override", None) or []:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--override expects key=value, got {kv!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    if name.startswith("FlowDCN"):
        out["msdcn_impl"] = args.msdcn_impl
    return out


def build_step(name: str, latent: int, batch: int, sched: ScheduleConfig, strategy_cfg: StrategyConfig,
               overrides: dict):
    """The trainer's step on synthetic latents: returns (strategy, step); step() runs one step, returns the loss."""
    dev = dist.device()
    strategy = build_strategy(strategy_cfg, sched, OptimConfig(lr=1e-4))
    torch.manual_seed(0)
    strategy.setup(lambda device: build_model(name, device=device, **overrides),
                   lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0,
                                                    fused=True if dev.type == "cuda" else None))
    ema = EMA(strategy.ema_params(), 0.9999)
    null = strategy.module.cfg.num_classes
    x = torch.randn(batch, strategy.module.in_channels, latent, latent, device=dev)
    y = torch.randint(0, null, (batch,), device=dev)

    def step() -> torch.Tensor:
        noise = StepNoise(torch.rand(batch, device=dev), torch.randn_like(x), torch.rand(batch, device=dev) < 0.1)
        with strategy.autocast():
            loss = flow_loss(strategy.model, x, y, noise, null).mean()
        strategy.backward(loss)
        strategy.clip_grad_norm(0.0)
        strategy.step(1e-4)
        ema.update(strategy.ema_params())
        return loss

    return strategy, step


def _mark(dev: torch.device):
    """A point on the device timeline: a recorded CUDA event, or the host clock on CPU."""
    if dev.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _elapsed_ms(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def bench_one(name: str, res: int, batch: int, compile_: bool, args) -> dict:
    """Time ``args.steps`` training steps after ``args.warmup`` untimed ones; returns one result row."""
    world = dist.get_world_size()
    dev = dist.device()
    latent = res // 8 if res >= 64 else res   # tiny smoke sizes are already latent sizes
    sched = ScheduleConfig(global_batch=batch * world, precision=args.precision, compile=compile_,
                           compile_mode=args.compile_mode, activation_checkpointing=args.ac)
    overrides = model_overrides(name, args)
    strategy, step = build_step(name, latent, batch, sched,
                                StrategyConfig(name=args.strategy, reshard_after_forward=args.reshard == "on",
                                               blocks_per_unit=args.blocks_per_unit),
                                overrides)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    torch._dynamo.reset()   # each row traces (and counts its graph breaks) afresh, not reusing an earlier row's code
    torch._dynamo.utils.counters.clear()
    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    t_compile = time.perf_counter() - t_compile
    # A graph break keeps the math and costs speed (host time per extra graph): report it with every number.
    graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Per-step intervals between consecutive step starts on the GPU timeline (events wait for neither host nor GPU,
    # so an interval is max(host, GPU) time of that step); the median step is robust to one slow step (a late
    # CUDA-graph re-record, an allocator flush) that moved a 10-step mean by up to 50 % on an H200.
    marks = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        marks.append(_mark(dev))
        loss = step()
    marks.append(_mark(dev))
    sync()
    dt_total = time.perf_counter() - t0
    steps_ms = [_elapsed_ms(a, b) for a, b in zip(marks, marks[1:])]
    dt = statistics.median(steps_ms) / 1e3 * args.steps   # the median step, scaled to args.steps steps
    imgs = args.steps * batch * world
    flops = train_flops_per_image(name, overrides, latent, latent)
    tflops = flops * imgs / dt / world / 1e12
    peak = peak_tflops()
    row = {"model": name, "res": res, "latent": latent, "batch_per_gpu": batch, "world": world,
           "strategy": args.strategy, "reshard_after_forward": args.reshard == "on",
           "blocks_per_unit": args.blocks_per_unit if args.strategy == "fsdp" else None,
           "compile": compile_,
           "compile_mode": args.compile_mode if compile_ else None, "precision": args.precision, "ac": args.ac,
           "img_per_s": imgs / dt, "tok_per_s": imgs * (latent // strategy.module.patch_size) ** 2 / dt,
           "step_ms": dt / args.steps * 1e3, "step_ms_mean": dt_total / args.steps * 1e3,
           "step_ms_all": [round(m, 3) for m in steps_ms], "warmup_s": t_compile, "graph_breaks": graph_breaks,
           "tflops_per_gpu": tflops,
           "mfu": tflops / peak if peak else None, "gflops_per_img": flops / 1e9, "loss": float(loss)}
    if dev.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    strategy.close()
    del strategy, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def world_size() -> int:
    return dist.get_world_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["FlowDCN-XL/2", "SiT-XL/2"])
    ap.add_argument("--res", nargs="+", type=int, default=[256, 512, 1024], help="image px (latent = px/8)")
    ap.add_argument("--batch", type=int, default=0, help="per-GPU batch; 0 = 32/8/2 at 256/512/1024 px")
    ap.add_argument("--compile", default="off,on", help="comma list of off/on")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode for compile=on (reduce-overhead = CUDA graphs)")
    ap.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "zero2", "zero3"])
    ap.add_argument("--blocks-per-unit", type=int, default=StrategyConfig.blocks_per_unit, help="fsdp: blocks sharded together as one unit")
    ap.add_argument("--reshard", choices=["on", "off"], default="on" if StrategyConfig.reshard_after_forward else "off",
                    help="fsdp: free the unsharded blocks after forward (on) or keep them for backward (off)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--ac", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="model config overrides for every model, e.g. hidden_size=64 groups=4 (CPU host-time proxy)")
    ap.add_argument("--msdcn-impl", default="auto", choices=["auto", "torch", "cuda"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default="", help="JSON output path")
    args = ap.parse_args()
    if args.device == "cpu" and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""   # must precede any CUDA use
        torch.cuda.is_available = lambda: False
    dist.init(require=args.strategy != "ddp")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    for res in args.res:
        for name in args.models:
            for c in args.compile.split(","):
                batch = args.batch or DEFAULT_BATCH.get(res, 8)
                try:
                    row = bench_one(name, res, batch, c == "on", args)
                except Exception as e:   # OOM, or a compile failure: record it and go on with the next config
                    if world_size() > 1:
                        raise                # ranks would disagree on what to run next
                    kind = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
                    row = {"model": name, "res": res, "batch_per_gpu": batch, "compile": c == "on",
                           "error": f"{kind}: {' | '.join(str(e).strip().splitlines()[:3])}"[:400]}
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                rows.append(row)
                if dist.get_rank() == 0:
                    print(json.dumps(row), flush=True)
    if dist.get_rank() != 0:
        dist.destroy()
        return
    # Table + FlowDCN/SiT speed ratio at each (res, compile).
    print(f"\n{'model':14} {'px':>5} {'B':>3} {'world':>5} {'compile':>7} {'img/s':>9} {'ms/step':>8} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GB':>8} {'breaks':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:14} {r['res']:>5} {r['batch_per_gpu']:>3} {'':>5} {str(r['compile']):>7} {r['error'][:40]}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        print(f"{r['model']:14} {r['res']:>5} {r['batch_per_gpu']:>3} {r['world']:>5} {str(r['compile']):>7} "
              f"{r['img_per_s']:9.2f} {r['step_ms']:8.1f} {r['tflops_per_gpu']:8.2f} {mfu:>6} "
              f"{r.get('peak_mem_gb', float('nan')):8.2f} {r['graph_breaks']:6d}")
    ratios = {}
    for r in rows:
        if r["model"].startswith("FlowDCN") and "error" not in r:
            sit = next((s for s in rows if s["model"].startswith("SiT") and s["res"] == r["res"]
                        and s["compile"] == r["compile"] and "error" not in s), None)
            if sit:
                ratios[f"{r['res']}px compile={r['compile']}"] = r["img_per_s"] / sit["img_per_s"]
    for k, v in ratios.items():
        print(f"FlowDCN / SiT img/s at {k}: {v:.2f}x")
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
              "rows": rows, "flowdcn_over_sit": ratios}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    dist.destroy()


if __name__ == "__main__":
    main()
