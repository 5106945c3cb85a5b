"""Learning rate as a pure function of images seen (official recipe: constant 1e-4, no warm-up)."""


def learning_rate(nimg: int, base_lr: float, warmup_nimg: int = 0) -> float:
    """Linear warm-up over ``warmup_nimg`` images, then constant."""
    if warmup_nimg > 0 and nimg < warmup_nimg:
        return base_lr * (nimg + 1) / warmup_nimg
    return base_lr
