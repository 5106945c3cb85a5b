"""Evaluation throughput on one GPU: model NFE, VAE decode, Inception features, metric maths, and a small
end-to-end ``evaluate()`` run. Prints a table and writes JSON. Random weights everywhere (same compute as real).

    python bench/eval_throughput.py --json $OUT/eval_throughput.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def timed(fn, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds per call (CUDA-synchronised)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def sd_vae():
    """A randomly initialised AutoencoderKL with the sd-vae-ft-ema architecture."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="FlowDCN-XL/2")
    ap.add_argument("--e2e-model", default="FlowDCN-B/2")
    ap.add_argument("--batch", type=int, default=125)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--msdcn-impl", default="auto")
    ap.add_argument("--e2e-samples", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from cuda_ext.msdcn import cuda_available
    from evaluation.inception import InceptionV3FID
    from evaluation.metrics import frechet_distance, precision_recall
    from evaluation.stats import FeatureStats
    from modeling import build_model

    dev = torch.device("cuda")
    rows, out = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                     "msdcn_cuda_available": None}
    lat = args.res // 8

    # 1. Model NFE with CFG (2x batch), bf16 autocast and fp32.
    model = build_model(args.model, device="meta", msdcn_impl=args.msdcn_impl).to_empty(device=dev)
    model.init_weights()
    model.eval().requires_grad_(False)
    out["msdcn_cuda_available"] = cuda_available()
    x = torch.randn(2 * args.batch, 4, lat, lat, device=dev)
    t = torch.rand(2 * args.batch, device=dev)
    y = torch.randint(0, 1001, (2 * args.batch,), device=dev)
    for dt in ("bf16", "fp32"):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt == "bf16"):
            s = timed(lambda: model(x, t, y))
        ips = args.batch / s                                  # guided images per NFE-second
        rows.append((f"{args.model} CFG NFE {dt}, batch {args.batch}x2, {args.res}px", f"{s * 1e3:.1f} ms", f"{ips:.0f} img·NFE/s"))
        out[f"nfe_cfg_{dt}_s"] = s
        for name, nfe in (("sde250", 250), ("euler50", 50), ("ab2_10", 10)):
            out[f"est_50k_{name}_{dt}_gpu_hours"] = 50_000 * nfe / ips / 3600
    del model, x
    torch.cuda.empty_cache()

    # 2. VAE decode (fp32, as the official eval).
    vae = sd_vae().to(dev).eval().requires_grad_(False)
    z = torch.randn(args.batch, 4, lat, lat, device=dev)
    with torch.no_grad():
        s = timed(lambda: vae.decode(z).sample)
    rows.append((f"VAE decode fp32 (sd-vae arch), batch {args.batch}", f"{s * 1e3:.1f} ms", f"{args.batch / s:.0f} img/s"))
    out["vae_decode_img_per_s"] = args.batch / s
    del vae
    torch.cuda.empty_cache()

    # 3. Inception features (fp32; TF1 resize to 299 inside).
    inc = InceptionV3FID().to(dev).eval()
    imgs = torch.randint(0, 256, (200, 3, args.res, args.res), dtype=torch.uint8, device=dev)
    s = timed(lambda: inc(imgs))
    rows.append(("Inception pool+spatial+logits fp32, batch 200", f"{s * 1e3:.1f} ms", f"{200 / s:.0f} img/s"))
    out["inception_img_per_s"] = 200 / s

    # 4. Metric maths at 50K scale.
    st = FeatureStats(2048, dev)
    f = torch.rand(1000, 2048, device=dev)
    s = timed(lambda: st.update(f), warmup=1, reps=5)
    rows.append(("FeatureStats.update fp64, 1000x2048 on GPU", f"{s * 1e3:.2f} ms", f"{50 * s:.2f} s per 50K"))
    a = torch.randn(4000, 2048, dtype=torch.float64)
    s1, s2 = a.T @ a / 4000, (a * 1.1).T @ (a * 1.1) / 4000
    t0 = time.perf_counter()
    frechet_distance(torch.zeros(2048), s1, torch.zeros(2048), s2)
    rows.append(("frechet_distance 2048-d (CPU fp64 eigh)", f"{time.perf_counter() - t0:.2f} s", ""))
    real, fake = torch.randn(10_000, 2048, device=dev), torch.randn(50_000, 2048, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    precision_recall(real, fake, k=3, device=dev)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    rows.append(("precision/recall k=3, 50K fake vs 10K real", f"{s:.2f} s", ""))
    out["pr_50k_10k_s"] = s
    del real, fake, inc, imgs
    torch.cuda.empty_cache()

    # 5. End-to-end evaluate(): random checkpoint + random SD-VAE + random Inception weights, all on disk.
    from safetensors.torch import save_file

    from evaluation.config import EvalConfig, MetricsConfig, ModelLoadConfig, SamplingConfig
    from evaluation.run import evaluate

    with tempfile.TemporaryDirectory() as d:
        m = build_model(args.e2e_model, msdcn_impl=args.msdcn_impl)
        os.makedirs(f"{d}/ckpt")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{d}/ckpt/ema.safetensors",
                  metadata={"model": args.e2e_model, "model_overrides": json.dumps({"msdcn_impl": args.msdcn_impl})})
        sd_vae().save_pretrained(f"{d}/vae", safe_serialization=True)
        torch.save(InceptionV3FID().state_dict(), f"{d}/inc.pth")
        cfg = EvalConfig(model=ModelLoadConfig(ckpt=f"{d}/ckpt"), vae=f"{d}/vae", resolutions=[[args.res, args.res], [224, 448]],
                         sampling=SamplingConfig(solver="euler", steps=10, cfg_scale=1.5, num_samples=args.e2e_samples,
                                                 chunk_size=250, batch_size=args.batch, dtype="bf16", smax_policy="official"),
                         metrics=MetricsConfig(inception_weights=f"{d}/inc.pth"), out_dir=f"{d}/out", grid_size=16)
        t0 = time.perf_counter()
        rep = evaluate(cfg)
        wall = time.perf_counter() - t0
        for r in rep["results"]:
            h, w = r["resolution"]
            ips = r["num_samples"] / r["sampling_seconds"]
            rows.append((f"evaluate() {args.e2e_model} euler-10 CFG bf16 {h}x{w}, N={r['num_samples']}",
                         f"{r['sampling_seconds']:.1f} s", f"{ips:.1f} img/s (IS={r['metrics']['is']:.3f})"))
            out[f"e2e_{h}x{w}_img_per_s"] = ips
        out["e2e_wall_s"] = wall

    w0 = max(len(r[0]) for r in rows)
    print(f"device: {out['device']}  torch {out['torch']}  msdcn cuda kernels: {out['msdcn_cuda_available']}")
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:>10}  {r[2]}")
    out["rows"] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
