"""Parallelism strategies behind one interface (trainer.parallel.base.Strategy)."""
from .base import DDPStrategy, Strategy


def build_strategy(cfg, precision: str) -> Strategy:
    """ddp | fsdp | zero1 | zero2 | zero3 -> a Strategy instance."""
    if cfg.name == "ddp":
        return DDPStrategy(cfg, precision)
    raise ValueError(f"unknown strategy {cfg.name!r}")


__all__ = ["Strategy", "DDPStrategy", "build_strategy"]
