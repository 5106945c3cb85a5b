"""Sample grids and loss curves written as PNG during and after training."""
from __future__ import annotations

import os

import torch
from PIL import Image

from modeling import build_model
from modeling.guidance import cfg_wrapper
from modeling.samplers import noise_for_indices, sample


def build_ema_model(name: str, overrides: dict, ema_weights: dict[str, torch.Tensor], device) -> torch.nn.Module:
    """A fresh eval-mode model holding the consolidated EMA weights."""
    model = build_model(name, device="meta", **overrides)
    model.to_empty(device=device)
    model.init_weights()   # buffers (prior grid) and anything not in the EMA dict
    missing, unexpected = model.load_state_dict(ema_weights, strict=False)
    trainable = {n for n, p in model.named_parameters()}
    if unexpected or (set(missing) & trainable):
        raise KeyError(f"EMA weights do not match {name}: missing {sorted(set(missing) & trainable)[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


@torch.no_grad()
def sample_class_grid(model, classes: list[int], per_class: int, shape, sampler_cfg, cfg_scale: float, null_class: int,
                      seed: int, device, batch: int = 256) -> torch.Tensor:
    """Samples [len(classes)*per_class, C, H, W] in model space; sample i's noise depends only on (seed, i)."""
    labels = torch.tensor([c for c in classes for _ in range(per_class)], device=device)
    fn = cfg_wrapper(lambda x, t, y: model(x, t, y), cfg_scale, null_class)
    out = []
    for s in range(0, len(labels), batch):
        idx = list(range(s, min(s + batch, len(labels))))
        x = noise_for_indices(idx, shape, seed, device=device)
        out.append(sample(fn, x, labels[idx], sampler_cfg).float().cpu())
    return torch.cat(out)


def save_grid(images: torch.Tensor, rows: int, path: str, scale: int = 4) -> None:
    """images [N, C, H, W] in [-1, 1] -> a rows × (N/rows) PNG grid, nearest-upscaled ``scale``×.

    Each cell gets a 1-pixel mid-grey frame so that small images (8×8 digits) do not run into each other.
    """
    images = torch.nn.functional.pad(images.clamp(-1, 1), (1, 1, 1, 1), value=0.0)
    N, C, H, W = images.shape
    cols = N // rows
    x = ((images + 1) * 127.5).round().to(torch.uint8)
    x = x[: rows * cols].view(rows, cols, C, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, cols * W, C).numpy()
    img = Image.fromarray(x[..., 0] if C == 1 else x[..., :3])
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def save_loss_curve(records: list[dict], path: str) -> None:
    """Loss against images seen (log scale), from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "loss" in r]
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["nimg"] for r in recs], [r["loss"] for r in recs])
    ax.set_xlabel("images seen")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
