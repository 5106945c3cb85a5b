"""Parallelism strategies behind one interface (trainer.parallel.base.Strategy)."""
from .base import DDPStrategy, Strategy


def build_strategy(cfg, sched, optim) -> Strategy:
    """ddp | fsdp | zero1 | zero2 | zero3 -> a Strategy (cfg: StrategyConfig, sched: ScheduleConfig, optim: OptimConfig)."""
    if cfg.name == "ddp":
        return DDPStrategy(cfg, sched.precision, sched.activation_checkpointing, sched.compile, sched.compile_mode)
    if cfg.name == "fsdp":
        from .fsdp import FSDPStrategy

        return FSDPStrategy(cfg, sched.precision, sched.activation_checkpointing, sched.compile, sched.compile_mode)
    if cfg.name in ("zero1", "zero2", "zero3"):
        from .deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, sched, optim)
    raise ValueError(f"unknown strategy {cfg.name!r} (ddp | fsdp | zero1 | zero2 | zero3)")


__all__ = ["Strategy", "DDPStrategy", "build_strategy"]
