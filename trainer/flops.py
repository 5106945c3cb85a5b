"""Model FLOPs per image (for MFU) and the peak bf16 throughput of known GPUs.

FLOPs are counted by running one forward of a ``meta``-device copy of the model under
``torch.utils.flop_counter.FlopCounterMode``: that counts every matmul, convolution and attention
(SDPA) exactly, i.e. the analytic 2·M·N·K per matmul, with no real computation. A training step
is counted as 3× the forward (backward = 2× forward). The MSDCN op's bilinear gather
(``grid_sample``: 4 corners × K points per group channel, ~8·K·D FLOPs per token, < 1 % of a
FlowDCN block) is memory-bound and is *not* counted, like softmax and norms; MFU therefore
measures useful matmul work, the convention of PaLM/torchtitan.
"""
from __future__ import annotations

import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak, TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


@functools.lru_cache(maxsize=64)
def forward_flops_per_image(name: str, overrides_json: str, height: int, width: int) -> float:
    """Matmul FLOPs of one forward of model ``name`` on one [C, height, width] input (meta device)."""
    from modeling import build_model

    overrides = json.loads(overrides_json)
    model = build_model(name, device="meta", **overrides)
    x = torch.empty(1, model.in_channels, height, width, device="meta")
    t = torch.empty(1, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return float(counter.get_total_flops())


def train_flops_per_image(name: str, overrides: dict, height: int, width: int) -> float:
    """Forward + backward FLOPs of one image (3× forward)."""
    ovr = {k: v for k, v in overrides.items() if k != "msdcn_impl"}
    if name.startswith("FlowDCN"):
        ovr["msdcn_impl"] = "torch"   # the meta forward must not pick the CUDA kernels
    return 3.0 * forward_flops_per_image(name, json.dumps(ovr, sort_keys=True), height, width)


def peak_tflops(override: float = 0.0) -> float:
    """Peak bf16 TFLOP/s of this device: ``override`` if > 0, else a table lookup (0 when unknown, e.g. CPU)."""
    if override > 0:
        return override
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
