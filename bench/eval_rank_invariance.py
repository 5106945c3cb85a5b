"""GPU check that evaluation results do not depend on the number of ranks (NCCL): prepare assets, then compare runs.

    python bench/eval_rank_invariance.py prepare DIR
    torchrun --nproc_per_node 1 -m evaluation.run $(python bench/eval_rank_invariance.py args DIR DIR/one)
    torchrun --nproc_per_node 2 -m evaluation.run $(python bench/eval_rank_invariance.py args DIR DIR/two)
    python bench/eval_rank_invariance.py compare DIR/one DIR/two [--json out.json]
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch


def prepare(d: str) -> None:
    """Random FlowDCN-S/2 checkpoint, random sd-vae-arch VAE, random Inception weights, a random reference npz."""
    from safetensors.torch import save_file

    from evaluation.inception import InceptionV3FID
    from modeling import build_model

    torch.manual_seed(0)
    m = build_model("FlowDCN-S/2")
    with torch.no_grad():   # the final layer is zero-initialised: perturb so samples depend on noise and label
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    os.makedirs(f"{d}/ckpt", exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{d}/ckpt/ema.safetensors",
              metadata={"model": "FlowDCN-S/2", "model_overrides": "{}"})
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(f"{d}/vae", safe_serialization=True)
    inc = InceptionV3FID()
    for mod in inc.modules():  # BN running stats := batch stats of random images, so features stay non-degenerate
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = 1.0
    inc.train()(torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8))
    torch.save(inc.state_dict(), f"{d}/inc.pth")
    rng = np.random.default_rng(0)
    np.savez(f"{d}/ref.npz", arr_0=rng.integers(0, 256, (200, 64, 64, 3)).astype(np.uint8))


def args(d: str, out: str) -> str:
    """The Hydra overrides shared by both runs."""
    return " ".join([
        f"model.ckpt={d}/ckpt", f"vae={d}/vae", f"metrics.inception_weights={d}/inc.pth", f"reference.npz={d}/ref.npz",
        "resolutions=[[224,448]]", "sampling=euler50", "sampling.steps=10", "sampling.cfg_scale=1.5",
        "sampling.smax_policy=official", "sampling.num_samples=400", "sampling.chunk_size=100", "sampling.batch_size=50",
        "sampling.dtype=bf16", f"out_dir={out}", "run_name=r", f"reference.cache_dir={out}/ref_cache", "grid_size=16",
    ])


def compare(a: str, b: str, out_json: str | None) -> None:
    """Bitwise comparison of chunk files and relative differences of the all-reduced statistics and metrics."""
    from safetensors.torch import load_file

    ra, rb = os.path.join(a, "r", "224x448"), os.path.join(b, "r", "224x448")
    chunks = sorted(f for f in os.listdir(os.path.join(ra, "chunks")) if f.endswith(".safetensors"))
    bitwise = {}
    for f in chunks:
        ta, tb = load_file(os.path.join(ra, "chunks", f)), load_file(os.path.join(rb, "chunks", f))
        bitwise[f] = all(torch.equal(ta[k], tb[k]) for k in ta)
    sa, sb = load_file(os.path.join(ra, "stats.safetensors")), load_file(os.path.join(rb, "stats.safetensors"))
    stat_rel = {k: float((sa[k] - sb[k]).abs().max() / sa[k].abs().max()) for k in sa}
    ma = json.load(open(os.path.join(a, "r", "metrics.json")))
    mb = json.load(open(os.path.join(b, "r", "metrics.json")))
    res = {"world_sizes": [ma["world_size"], mb["world_size"]], "device": ma["device"], "chunks_bitwise_equal": bitwise,
           "stats_max_rel_diff": stat_rel, "metrics": [ma["results"][0]["metrics"], mb["results"][0]["metrics"]],
           "sampling_seconds": [ma["results"][0]["sampling_seconds"], mb["results"][0]["sampling_seconds"]]}
    print(json.dumps(res, indent=1))
    if out_json:
        json.dump(res, open(out_json, "w"), indent=1)
    ok = all(bitwise.values()) and max(stat_rel.values()) < 1e-10
    print("RANK INVARIANCE:", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(sys.argv[2])
    elif cmd == "args":
        print(args(sys.argv[2], sys.argv[3]))
    else:
        compare(sys.argv[2], sys.argv[3], sys.argv[5] if len(sys.argv) > 5 else None)
