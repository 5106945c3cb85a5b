"""MSDCN op benchmark: our CUDA kernels vs the PyTorch reference vs SDPA (flash) on the same token count.

Shapes: FlowDCN-XL/2 (G=16, C=72, K=9) and B/2 (G=12, C=64, K=9), batch 32, token grids 16², 32², 64²;
bf16 value, fp32 fields (delta, scale_logit, weights), as in the targets of issue 3. Times are the
median of CUDA-event timings after warm-up, rotating between input sets so small cases do not run from
L2. "floor" is the byte floor (each input read once, each output written once) over the measured
device-to-device copy bandwidth. Optionally times one FlowDCN-XL block against one SiT-XL block.

    python bench/msdcn_op.py --json bench_msdcn.json [--block] [--sweep] [--diagnose]
    python bench/msdcn_op.py --no-op --no-ref --tile-sweep --tiled   # tiled backward: sweep, then vs untiled
    python bench/msdcn_op.py --no-op --no-ref --backwards            # gather vs scatter backward
    python bench/msdcn_op.py --no-op --no-ref --backwards --pull-vecs 1,2,3,4   # and each gather pull width
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_ext.msdcn import cuda as msdcn_cuda  # noqa: E402
from cuda_ext.msdcn.reference import deform_offsets_ref, msdcn_ref  # noqa: E402

SHAPES = {"XL": (16, 72, 9), "B": (12, 64, 9)}  # (G, C, K)
GRIDS = (16, 32, 64)
BATCH = 32


def cuda_time(fn, sets: list, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of fn(*inputs) over reps, rotating between input sets, CUDA events."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = sets[i % len(sets)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time(fn, args, reps: int = 30) -> float:
    """Median milliseconds of one replay of fn(*args) captured in a CUDA graph (no CPU launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return cuda_time(lambda: graph.replay(), [()], warmup=3, reps=reps)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), 1 GiB buffer."""
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = cuda_time(lambda x, y: y.copy_(x), [(a, b)], warmup=3, reps=10)
    return 2 * a.numel() * 4 / ms / 1e6


def make_inputs(B, H, W, G, C, K, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    value = torch.randn(B, H, W, G, C, device="cuda", generator=gen).to(torch.bfloat16)
    delta = torch.randn(B, H, W, G, K, 2, device="cuda", generator=gen) * 0.5
    scale = torch.randn(B, H, W, G, K, device="cuda", generator=gen)
    weights = torch.randn(B, H, W, G, K, device="cuda", generator=gen) * 0.3
    prior = torch.tensor([[x, y] for y in (-1.0, 0.0, 1.0) for x in (-1.0, 0.0, 1.0)], device="cuda")[:K]
    q = (torch.arange(G, device="cuda", dtype=torch.float64) + 1) / G - 1e-4
    s0 = torch.log(q / (1 - q)).float()
    s_max = torch.tensor([6.0, 6.0], device="cuda")
    return value, delta, scale, weights, prior, s0, s_max


def with_grad(inputs):
    value, delta, scale, weights, prior, s0, s_max = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, delta, scale, weights, s0)]
    grad = torch.randn_like(value)
    return leaves[:4] + [prior, leaves[4], s_max, grad]


def ours_fwd(v, d, s, w, p, z, m):
    return msdcn_cuda.msdcn_deform(v, d, s, w, p, z, m)


def ours_fwdbwd(v, d, s, w, p, z, m, g):
    out = msdcn_cuda.msdcn_deform(v, d, s, w, p, z, m)
    torch.autograd.grad(out, [v, d, s, w, z], g)


def packed_inputs(v, d, s, w, p, z, m, g):
    """The model's case: one bf16 projection [B,H,W,G*C + 4*G*K] (value | delta | scale_logit | weights), as autocast
    gives it, for msdcn_deform_packed (the training forward buckets the points for the backward)."""
    G, K = w.shape[-2:]
    proj = torch.cat([v.flatten(-2), d.flatten(-3), s.flatten(-2), w.flatten(-2)], -1).detach().to(torch.bfloat16)
    return proj.requires_grad_(True), p, z, m, g, G, K


def packed_fwd(proj, p, z, m, g, G, K):
    with torch.no_grad():
        return msdcn_cuda.msdcn_deform_packed(proj, p, z, m, groups=G, points=K)


def packed_fwdbwd(proj, p, z, m, g, G, K):
    out = msdcn_cuda.msdcn_deform_packed(proj, p, z, m, groups=G, points=K)
    torch.autograd.grad(out, [proj, z], g)


def ref_fwd(v, d, s, w, p, z, m):
    return torch.ops.flowdcn.msdcn_ref(v, deform_offsets_ref(d, s, p, z, m), w, "floor")


def ref_fwdbwd(v, d, s, w, p, z, m, g):
    out = ref_fwd(v, d, s, w, p, z, m)
    torch.autograd.grad(out, [v, d, s, w, z], g)


def sdpa_inputs(B, T, G, C, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = [torch.randn(B, G, T, C, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_(True) for _ in range(3)]
    return qkv + [torch.randn(B, G, T, C, device="cuda", generator=gen).to(torch.bfloat16)]


def sdpa_fwd(q, k, v, g):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_fwdbwd(q, k, v, g):
    torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), [q, k, v], g)


def byte_floor(B, H, W, G, C, K) -> tuple[int, int]:
    """Bytes (forward, forward+backward): bf16 value/out/grads, fp32 fields and field grads, each touched once."""
    n = B * H * W * G
    val, fields = n * C * 2, n * K * 4 * 4  # delta(2) + scale + weights, fp32
    fwd = val + fields + val
    bwd = val + val + fields + val + fields  # read grad_out, value, fields; write grad value, grad fields
    return fwd, fwd + bwd


def sweep_launch(G, C, K, H) -> dict:
    """Threads-per-block target and rounds per block for forward and backward, best of a grid, at one size."""
    sets = [with_grad(make_inputs(BATCH, H, H, G, C, K, s)) for s in range(2)]
    best = {}
    grids = {"forward": [(t, r) for t in (128, 256, 512) for r in (1, 2, 4, 8, 16)]}
    if msdcn_cuda._BACKWARD == "scatter":  # the gather backward's kernels have launch shapes of their own
        grids["backward"] = [(t, r) for t in (128, 256, 384) for r in (1, 2, 4, 8)]
    for phase, grid in grids.items():
        res = {}
        for t, r in grid:
            msdcn_cuda.set_launch(phase, threads=t, rounds=r)
            res[(t, r)] = cuda_time(lambda *a: ours_fwd(*a[:7]), sets) if phase == "forward" else cuda_time(ours_fwdbwd, sets)
        best[phase] = min(res, key=res.get)
        msdcn_cuda.set_launch(phase, *best[phase])
        print(f"  sweep {phase} G={G} C={C} {H}²: " + ", ".join(f"{t}x{r}: {ms:.3f}" for (t, r), ms in res.items()) + f" -> {best[phase]}", flush=True)
    return {k: list(v) for k, v in best.items()}


def diagnose(G, C, K, H) -> dict:
    """Kernel times from the profiler, and the scatter backward's fwd+bwd with its grad_value atomics switched off (their share)."""
    from torch.profiler import ProfilerActivity, profile

    sets = [with_grad(make_inputs(BATCH, H, H, G, C, K, s)) for s in range(2)]
    out = {"full_fwdbwd_ms": cuda_time(ours_fwdbwd, sets)}
    split = msdcn_cuda._SPLIT_BWD
    msdcn_cuda._SPLIT_BWD = not split
    out[f"split_{not split}_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda._SPLIT_BWD = split
    lean = msdcn_cuda._LEAN_BWD
    msdcn_cuda._LEAN_BWD = not lean
    out[f"lean_{not lean}_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda._LEAN_BWD = lean
    l1 = msdcn_cuda._L1_PREF_BWD
    msdcn_cuda._L1_PREF_BWD = not l1
    out[f"l1_pref_{not l1}_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda._L1_PREF_BWD = l1
    saved = msdcn_cuda._BACKWARD
    msdcn_cuda.set_backward("scatter")  # the atomics' share: only the scatter backward has them
    out["scatter_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda._DIAG_SKIP_VALUE_GRAD = True
    out["scatter_no_value_atomics_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda._DIAG_SKIP_VALUE_GRAD = False
    msdcn_cuda.set_backward(saved)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            ours_fwdbwd(*sets[i % 2])
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            kernels[e.key[:60]] = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / 10 / 1000
    out["kernels_ms_per_call"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
    print(f"  diagnose G={G} C={C} {H}²: {json.dumps(out)}", flush=True)
    return out


def tile_sweep(G, C, K, H) -> dict:
    """fwd+bwd ms of the tiled backward per (tile, radius) at one size, and of the untiled one."""
    sets = [with_grad(make_inputs(BATCH, H, H, G, C, K, s)) for s in range(2 if H < 64 else 1)]
    saved = (msdcn_cuda._TILED_BWD, list(msdcn_cuda._TILE), msdcn_cuda._TILE_RADIUS, msdcn_cuda._TILED_MODE)
    res = {}
    msdcn_cuda.set_tiled(False)
    res["untiled"] = cuda_time(ours_fwdbwd, sets)
    for mode in ("sort", "atomic"):
        for tile in ((8, 8), (4, 16), (16, 4), (8, 16), (4, 8)):
            for radius in (0, 1, 2, 3, 4):
                msdcn_cuda.set_tiled(True, tile=tile, radius=radius, mode=mode)
                res[f"{mode}_{tile[0]}x{tile[1]}_r{radius}"] = cuda_time(ours_fwdbwd, sets)
    msdcn_cuda.set_tiled(saved[0], tile=saved[1], radius=saved[2], mode=saved[3])
    print(f"  tile sweep G={G} C={C} {H}²: " + ", ".join(f"{k}: {v:.3f}" for k, v in res.items()), flush=True)
    return res


def kernel_times(sets, reps: int = 10, fn=ours_fwdbwd) -> dict:
    """Per-call device time of each kernel of a fused fwd+bwd (fn), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            kernels[e.key[:60]] = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) / reps / 1000
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])


def compare_tiled(G, C, K, H) -> dict:
    """fwd+bwd ms and kernel times: untiled backward, tiled in both modes (current tile and radius)."""
    sets = [with_grad(make_inputs(BATCH, H, H, G, C, K, s)) for s in range(2 if H < 64 else 1)]
    saved = (msdcn_cuda._TILED_BWD, msdcn_cuda._TILED_MODE)
    out = {}
    for key, on, mode in (("untiled", False, None), ("sort", True, "sort"), ("atomic", True, "atomic")):
        msdcn_cuda.set_tiled(on, mode=mode)
        out[f"{key}_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
        out[f"{key}_graph_fwdbwd_ms"] = graph_time(ours_fwdbwd, sets[0])
        out[f"{key}_kernels_ms"] = kernel_times(sets)
    msdcn_cuda.set_tiled(saved[0], mode=saved[1])
    print(f"  tiled vs untiled G={G} C={C} {H}²: {json.dumps(out)}", flush=True)
    return out


def _put_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def env_var(name: str, value: str | None):
    """Set (None: unset) an environment switch the op reads on every call; restore it afterwards."""
    saved = os.environ.get(name)
    _put_env(name, value)
    try:
        yield
    finally:
        _put_env(name, saved)


def compare_backward(G, C, K, H, pull_vecs=(), kinds=("gather", "scatter")) -> dict:
    """fwd+bwd ms (eager, CUDA graph) and kernel times of the backward kinds (gather, scatter); then the gather backward
    with each pull width in pull_vecs that divides C/8 (FLOWDCN_MSDCN_PULL_VEC runs of 8 channels per lane)."""
    sets = [with_grad(make_inputs(BATCH, H, H, G, C, K, s)) for s in range(2 if H < 64 else 1)]
    saved = msdcn_cuda._BACKWARD
    out = {}
    runs = [(kind, kind, None) for kind in kinds]
    runs += [(f"gather_v{v}", "gather", str(v)) for v in pull_vecs if (C // 8) % v == 0]
    for key, kind, vec in runs:
        msdcn_cuda.set_backward(kind)
        with env_var("FLOWDCN_MSDCN_PULL_VEC", vec):
            out[f"{key}_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
            out[f"{key}_graph_fwdbwd_ms"] = graph_time(ours_fwdbwd, sets[0])
            out[f"{key}_kernels_ms"] = kernel_times(sets)
            torch.cuda.reset_peak_memory_stats()
            ours_fwdbwd(*sets[0])
            torch.cuda.synchronize()
            out[f"{key}_peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    msdcn_cuda.set_backward(saved)
    print(f"  {' vs '.join(kinds)} G={G} C={C} {H}²: {json.dumps(out)}", flush=True)
    return out


# (key, FLOWDCN_MSDCN_PLANE, FLOWDCN_MSDCN_PLANE_THREADS) of --planes
PLANE_RUNS = (("off", "off", None), ("on", "on", None), ("bwd", "bwd", None), ("fwd", "fwd", None), ("on_t512", "on", "512"),
              ("on_t576", "on", "576"), ("on_t1024", "on", "1024"))
# --plane-diag: the plane backward with phases left out (FLOWDCN_MSDCN_PLANE_DIAG bits: 1 the grad_value pull, 2 the corner
# dots, 4 the field grads; wrong grads, timing only)
PLANE_DIAGS = ("0", "1", "2", "4", "7")


def compare_planes(G, C, K, H, diag: bool = False) -> dict:
    """The packed op (the model's path) with the plane kernels off, on (both; the launcher's threads per block), only
    backward, only forward, and with 512 / 576 / 1024 threads per block: fwd+bwd ms eager and CUDA graph, forward-only
    CUDA graph, kernel times."""
    sets = [packed_inputs(*with_grad(make_inputs(BATCH, H, H, G, C, K, s))) for s in range(2)]
    out = {}
    for key, plane, threads in PLANE_RUNS:
        with env_var("FLOWDCN_MSDCN_PLANE", plane), env_var("FLOWDCN_MSDCN_PLANE_THREADS", threads):
            out[f"{key}_fwdbwd_ms"] = cuda_time(packed_fwdbwd, sets)
            out[f"{key}_graph_fwdbwd_ms"] = graph_time(packed_fwdbwd, sets[0])
            out[f"{key}_graph_fwd_ms"] = graph_time(packed_fwd, sets[0])
            out[f"{key}_kernels_ms"] = kernel_times(sets, fn=packed_fwdbwd)
    if diag:
        for bits in PLANE_DIAGS:
            with env_var("FLOWDCN_MSDCN_PLANE_DIAG", bits):
                ks = kernel_times(sets, fn=packed_fwdbwd)
                out[f"diag{bits}_backward_ms"] = next((v for k, v in ks.items() if "plane_backward" in k), float("nan"))
    print(f"  planes G={G} C={C} {H}²: {json.dumps(out)}", flush=True)
    return out


def bench_op(bw: float, with_ref: bool) -> list[dict]:
    rows = []
    for name, (G, C, K) in SHAPES.items():
        for H in GRIDS:
            B, W = BATCH, H
            sets = [with_grad(make_inputs(B, H, W, G, C, K, s)) for s in range(2 if H < 64 else 1)]
            row = {"shape": name, "grid": H, "B": B, "G": G, "C": C, "K": K}
            row["ours_fwd_ms"] = cuda_time(lambda *a: ours_fwd(*a[:7]), sets)
            row["ours_fwdbwd_ms"] = cuda_time(ours_fwdbwd, sets)
            row["ours_graph_fwd_ms"] = graph_time(lambda *a: ours_fwd(*a[:7]), sets[0])
            row["ours_graph_fwdbwd_ms"] = graph_time(ours_fwdbwd, sets[0])
            plain = []
            for v, d, s, w, p, z, m, g in sets:
                off = deform_offsets_ref(d.detach(), s.detach(), p, z.detach(), m).requires_grad_(True)
                plain.append((v, off, w, g))
            packed = [packed_inputs(*a) for a in sets]
            row["packed_fwdbwd_ms"] = cuda_time(packed_fwdbwd, packed)
            row["packed_graph_fwdbwd_ms"] = graph_time(packed_fwdbwd, packed[0])
            row["packed_kernels_ms"] = kernel_times(packed, fn=packed_fwdbwd)
            del packed
            row["plain_fwd_ms"] = cuda_time(lambda v, o, w, g: msdcn_cuda.msdcn(v, o, w), plain)
            row["plain_fwdbwd_ms"] = cuda_time(
                lambda v, o, w, g: torch.autograd.grad(msdcn_cuda.msdcn(v, o, w), [v, o, w], g), plain)
            del plain
            if with_ref and H <= 32:  # the reference materialises [B,H,W,G,K,C] per corner: too big at 64²
                try:
                    row["ref_fwd_ms"] = cuda_time(lambda *a: ref_fwd(*a[:7]), sets[:1], warmup=1, reps=5)
                    row["ref_fwdbwd_ms"] = cuda_time(ref_fwdbwd, sets[:1], warmup=1, reps=5)
                except torch.OutOfMemoryError:
                    row["ref_fwd_ms"] = row["ref_fwdbwd_ms"] = None
                torch.cuda.empty_cache()
            del sets
            qs = [sdpa_inputs(B, H * W, G, C, s) for s in range(2)]
            row["sdpa_fwd_ms"] = cuda_time(sdpa_fwd, qs)
            row["sdpa_fwdbwd_ms"] = cuda_time(sdpa_fwdbwd, qs)
            row["sdpa_graph_fwd_ms"] = graph_time(sdpa_fwd, qs[0])
            row["sdpa_graph_fwdbwd_ms"] = graph_time(sdpa_fwdbwd, qs[0])
            del qs
            fb, fbb = byte_floor(B, H, W, G, C, K)
            row["floor_fwd_ms"] = fb / bw / 1e6
            row["floor_fwdbwd_ms"] = fbb / bw / 1e6
            row["ours_fwd_GBps"] = fb / row["ours_fwd_ms"] / 1e6
            row["ours_fwdbwd_GBps"] = fbb / row["ours_fwdbwd_ms"] / 1e6
            rows.append(row)
            torch.cuda.empty_cache()
            print(f"  {name} {H}²: ours {row['ours_fwd_ms']:.3f}/{row['ours_fwdbwd_ms']:.3f} ms, packed graph {row['packed_graph_fwdbwd_ms']:.3f}, "
                  f"sdpa {row['sdpa_fwd_ms']:.3f}/{row['sdpa_fwdbwd_ms']:.3f} ms; packed kernels " + json.dumps(row["packed_kernels_ms"]), flush=True)
    return rows


def bench_blocks() -> list[dict]:
    """fwd+bwd of one FlowDCN-XL block (cuda MSDCN) vs one SiT-XL block (SDPA), bf16 autocast, batch 32."""
    import modeling

    rows = []
    for H in GRIDS:
        row = {"grid": H, "B": BATCH}
        for name in ("FlowDCN-XL/2", "SiT-XL/2"):
            kw = {"msdcn_impl": "cuda"} if name.startswith("FlowDCN") else {}
            model = modeling.build_model(name, device="meta", depth=1, **kw)
            model.to_empty(device="cuda")
            model.init_weights()
            block = model.blocks[0]
            with torch.no_grad():
                for p in block.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
            D = 1152
            x = torch.randn(BATCH, H, H, D, device="cuda", requires_grad=True)
            c = torch.randn(BATCH, D, device="cuda")
            s_max = torch.tensor([6.0, 6.0], device="cuda")

            def step(x, c):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = block(x, c, s_max) if name.startswith("FlowDCN") else block(x.flatten(1, 2), c)
                out.float().square().mean().backward()  # parameter grads accumulate, as in training

            row[name] = cuda_time(step, [(x, c)], warmup=3, reps=15)
            del model, block, x
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  block {H}²: FlowDCN-XL {row['FlowDCN-XL/2']:.3f} ms, SiT-XL {row['SiT-XL/2']:.3f} ms", flush=True)
    return rows


def main() -> None:
    global SHAPES, GRIDS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench_msdcn_op.json")
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--block", action="store_true", help="also time one FlowDCN-XL block vs one SiT-XL block")
    ap.add_argument("--sweep", action="store_true", help="pick threads per block and rounds at one XL shape first (--sweep-grid)")
    ap.add_argument("--diagnose", action="store_true", help="kernel times, launch variants, the scatter backward's atomics share")
    ap.add_argument("--tiled", action="store_true", help="compare the tiled and untiled backward (XL and B, all grids)")
    ap.add_argument("--tile-sweep", action="store_true", help="time tile shapes and halo radii of the tiled backward at XL 32² and 64²")
    ap.add_argument("--backwards", action="store_true", help="compare the gather and scatter backward (XL and B, all grids)")
    ap.add_argument("--pull-vecs", default="", help="with --backwards: also time these gather pull widths, e.g. 1,2,3,4")
    ap.add_argument("--kinds", default="gather,scatter", help="with --backwards: the backward kinds to time (gather,scatter)")
    ap.add_argument("--sweep-grid", type=int, default=32, help="with --sweep: the XL token grid swept")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of XL,B")
    ap.add_argument("--grids", default=",".join(map(str, GRIDS)), help="comma-separated subset of 16,32,64")
    ap.add_argument("--no-op", action="store_true", help="skip the main op table (with --tiled / --tile-sweep / --planes)")
    ap.add_argument("--plane-diag", action="store_true", help="with --planes: the plane backward kernel's time with phases left out")
    ap.add_argument("--planes", action="store_true", help="the packed op with the plane kernels off / on / per direction / "
                    "at other block sizes (--shapes, --grids)")
    args = ap.parse_args()
    SHAPES = {k: SHAPES[k] for k in args.shapes.split(",")}
    GRIDS = tuple(int(h) for h in args.grids.split(","))

    msdcn_cuda.require()
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {bw:.0f} GB/s", flush=True)
    result = {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "copy_GBps": bw, "command": " ".join(sys.argv)}
    if args.sweep:
        result["sweep_best"] = sweep_launch(16, 72, 9, args.sweep_grid)
    result["launch_used"] = {k: list(v) for k, v in msdcn_cuda._LAUNCH.items()}
    if args.diagnose:
        result["diagnose"] = {f"XL_{h}": diagnose(16, 72, 9, h) for h in GRIDS}
    if args.tile_sweep:
        result["tile_sweep"] = {f"XL_{h}": tile_sweep(16, 72, 9, h) for h in (32, 64)}
    if args.tiled:
        result["tiled"] = {f"{name}_{h}": compare_tiled(*SHAPES[name], h) for name in SHAPES for h in GRIDS}
    if args.backwards:
        vecs = tuple(int(v) for v in args.pull_vecs.split(",") if v)
        kinds = tuple(args.kinds.split(","))
        result["backwards"] = {f"{name}_{h}": compare_backward(*SHAPES[name], h, vecs, kinds) for name in SHAPES for h in GRIDS}
    if args.planes:
        result["planes"] = {f"{name}_{h}": compare_planes(*SHAPES[name], h, args.plane_diag) for name in SHAPES for h in GRIDS}
    result["op"] = [] if args.no_op else bench_op(bw, with_ref=not args.no_ref)
    if args.block:
        result["block"] = bench_blocks()
    Path(args.json).write_text(json.dumps(result, indent=1))

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    if result["op"]:
        print(f"\nMSDCN op, {dev}, batch {BATCH}, bf16 value, fp32 fields; ms (median); fused = deform field in-kernel")
        print("| shape | grid | ours fused fwd / fwd+bwd | ours fused, CUDA graph | packed fwd+bwd / CUDA graph | ours plain fwd / fwd+bwd | reference fwd / fwd+bwd | SDPA fwd / fwd+bwd | SDPA, CUDA graph | byte floor fwd / fwd+bwd | ours GB/s fwd / fwd+bwd |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["op"]:
        print(f"| {r['shape']} (G={r['G']},C={r['C']}) | {r['grid']}² | {f(r['ours_fwd_ms'])} / {f(r['ours_fwdbwd_ms'])} | "
              f"{f(r['ours_graph_fwd_ms'])} / {f(r['ours_graph_fwdbwd_ms'])} | {f(r['packed_fwdbwd_ms'])} / {f(r['packed_graph_fwdbwd_ms'])} | "
              f"{f(r['plain_fwd_ms'])} / {f(r['plain_fwdbwd_ms'])} | {f(r.get('ref_fwd_ms'))} / {f(r.get('ref_fwdbwd_ms'))} | "
              f"{f(r['sdpa_fwd_ms'])} / {f(r['sdpa_fwdbwd_ms'])} | {f(r['sdpa_graph_fwd_ms'])} / {f(r['sdpa_graph_fwdbwd_ms'])} | {f(r['floor_fwd_ms'])} / {f(r['floor_fwdbwd_ms'])} | "
              f"{r['ours_fwd_GBps']:.0f} / {r['ours_fwdbwd_GBps']:.0f} |")
    if args.tiled:
        print(f"\nTiled vs untiled backward: fused fwd+bwd ms, eager / CUDA graph / backward kernel; tile {msdcn_cuda._TILE}, radius {msdcn_cuda._TILE_RADIUS}")
        print("| shape | grid | untiled | tiled, sort | tiled, atomic |\n|---|---|---|---|---|")
        for key, r in result["tiled"].items():
            name, h = key.split("_")
            bk = lambda ks: next((v for k, v in ks.items() if "backward" in k), float("nan"))  # noqa: E731
            cells = [f"{r[m + '_fwdbwd_ms']:.3f} / {r[m + '_graph_fwdbwd_ms']:.3f} / {bk(r[m + '_kernels_ms']):.3f}" for m in ("untiled", "sort", "atomic")]
            print(f"| {name} | {h}² | " + " | ".join(cells) + " |")
    if args.backwards:
        print("\nBackward algorithms: fused fwd+bwd ms, eager / CUDA graph; peak GB of one fwd+bwd")
        print("| shape | grid | gather | scatter | gather kernels (ms per call) |\n|---|---|---|---|---|")
        for key, r in result["backwards"].items():
            name, h = key.split("_")
            cells = [f"{r[m + '_fwdbwd_ms']:.3f} / {r[m + '_graph_fwdbwd_ms']:.3f} ({r[m + '_peak_GB']:.2f} GB)" if m + "_fwdbwd_ms" in r
                     else "-" for m in ("gather", "scatter")]
            ks = ", ".join(f"{k.split('<')[0].split('(')[0][-28:]} {v:.3f}" for k, v in r.get("gather_kernels_ms", {}).items())
            print(f"| {name} | {h}² | " + " | ".join(cells) + f" | {ks} |")
        widths = [(key, k[len("gather_v"):-len("_fwdbwd_ms")]) for key, r in result["backwards"].items() for k in r
                  if k.startswith("gather_v") and k.endswith("_fwdbwd_ms") and "_graph_" not in k]
        if widths:
            print("\nGather pull widths (runs of 8 channels per lane): fwd+bwd ms eager / CUDA graph, pull kernel ms")
            for key, v in widths:
                r = result["backwards"][key]
                pull = next((t for k, t in r[f"gather_v{v}_kernels_ms"].items() if "pull" in k), float("nan"))
                print(f"  {key} V={v}: {r[f'gather_v{v}_fwdbwd_ms']:.3f} / {r[f'gather_v{v}_graph_fwdbwd_ms']:.3f}, pull {pull:.3f}")
    if args.planes:
        print("\nPlane kernels (packed op, bf16): fwd+bwd ms eager / CUDA graph; forward-only CUDA graph")
        print("| shape | grid | " + " | ".join(k for k, *_ in PLANE_RUNS) + " |\n|---|---|" + "---|" * len(PLANE_RUNS))
        for key, r in result["planes"].items():
            name, h = key.split("_")
            cells = [f"{r[k + '_fwdbwd_ms']:.3f} / {r[k + '_graph_fwdbwd_ms']:.3f}; {r[k + '_graph_fwd_ms']:.3f}" for k, *_ in PLANE_RUNS]
            print(f"| {name} | {h}² | " + " | ".join(cells) + " |")
            if args.plane_diag:
                print("    plane backward kernel ms with phases left out (diag bits): " +
                      ", ".join(f"{b}: {r[f'diag{b}_backward_ms']:.4f}" for b in PLANE_DIAGS))
    if args.block:
        print("\n| grid | FlowDCN-XL block fwd+bwd (ms) | SiT-XL block fwd+bwd (ms) |\n|---|---|---|")
        for r in result["block"]:
            print(f"| {r['grid']}² | {r['FlowDCN-XL/2']:.3f} | {r['SiT-XL/2']:.3f} |")


if __name__ == "__main__":
    main()
