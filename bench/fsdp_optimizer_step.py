"""Host time of the FSDP2 optimizer step: AdamW on the local shards (FSDPStrategy's default) vs through the DTensors.

The update is elementwise, so both give the same numbers (tests/trainer/fsdp_init_main.py checks it bitwise);
what differs is DTensor dispatch on the host. Times only ``strategy.step`` (AdamW + zero_grad), median over
``--steps`` calls, for torch's fused, foreach and single-tensor AdamW. A narrow model with XL's depth keeps the
kernels' own time small, so this is mostly host time; on a GPU it is host time plus launches.

    torchrun --standalone --nproc_per_node 1 bench/fsdp_optimizer_step.py --out $OUT/fsdp_optim.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling import build_model  # noqa: E402
from train_step import model_overrides  # noqa: E402  (the same --override parsing as the throughput benchmark)
from trainer import dist  # noqa: E402
from trainer.config import StrategyConfig  # noqa: E402
from trainer.parallel.fsdp import FSDPStrategy  # noqa: E402

IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}


def time_steps(model: str, overrides: dict, impl: str, local: bool, steps: int) -> float:
    """Median ms of strategy.step() with zero gradients present (the update's cost does not depend on them)."""
    torch.manual_seed(0)
    s = FSDPStrategy(StrategyConfig(name="fsdp"), precision="fp32")
    s.setup(lambda device: build_model(model, device=device, **overrides),
            lambda params: torch.optim.AdamW(params, lr=1e-4, **IMPLS[impl]))
    if not local:
        s._local_adam = False   # torch's step through the DTensors
    times = []
    for _ in range(steps):
        for p in s.module.parameters():   # zero_grad(set_to_none) dropped them: give every parameter a gradient
            p.grad = torch.zeros_like(p)
        if dist.device().type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s.step(1e-4)
        if dist.device().type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    s.close()
    return statistics.median(times[2:])   # the first step creates the optimizer state (always torch's path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="FlowDCN-XL/2")
    ap.add_argument("--override", nargs="*", default=["hidden_size=64", "groups=4"], metavar="KEY=VALUE",
                    help="model overrides (default: XL's 28 blocks at width 64); pass nothing for the real width")
    ap.add_argument("--msdcn-impl", default="auto", choices=["auto", "torch", "cuda"])
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dist.init(require=True)
    overrides = model_overrides(args.model, args)
    rows = []
    for impl in args.impls:
        local, dtensor = (time_steps(args.model, overrides, impl, flag, args.steps) for flag in (True, False))
        rows.append({"impl": impl, "local_ms": local, "dtensor_ms": dtensor})
    if dist.get_rank() == 0:
        print(f"{'AdamW':8} {'local shards ms':>16} {'DTensor ms':>11}")
        for r in rows:
            print(f"{r['impl']:8} {r['local_ms']:16.2f} {r['dtensor_ms']:11.2f}")
        result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "world": dist.get_world_size(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                  "model": args.model, "overrides": overrides, "rows": rows}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy()


if __name__ == "__main__":
    main()
