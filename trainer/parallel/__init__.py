"""Parallelism strategies behind one interface (trainer.parallel.base.Strategy)."""
from .. import dist
from .base import DDPStrategy, Strategy


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile(cfg, sched) -> None:
    """Refuse compile settings that cannot work, before any model is built.

    CUDA graphs (reduce-overhead / max-autotune) are allowed for one process without gradient accumulation
    only, and not under FSDP2: a replay overwrites the previous replay's outputs, and with accumulation those
    outputs are the .grad tensors still being summed (silently wrong gradients); FSDP2's all-gather and
    reduce-scatter hooks run around each block, and with several ranks DDP's hooks run between the graphs
    (untested here).
    """
    if sched.compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {sched.compile_mode!r}")
    if not (sched.compile and sched.compile_mode in CUDAGRAPH_MODES):
        return
    if cfg.name == "fsdp":
        raise ValueError(f"strategy fsdp: train.compile_mode={sched.compile_mode} uses CUDA graphs, which FSDP2 does not "
                         "support; use compile_mode=default or max-autotune-no-cudagraphs (or strategy=ddp)")
    world = dist.get_world_size()
    if world > 1:
        raise ValueError(f"train.compile_mode={sched.compile_mode} uses CUDA graphs, supported here for one process only "
                         f"(world size is {world}); use compile_mode=default")
    if sched.micro_batch and sched.micro_batch < sched.global_batch:
        raise ValueError(f"train.compile_mode={sched.compile_mode} uses CUDA graphs, which cannot accumulate gradients over "
                         f"micro-batches (train.micro_batch={sched.micro_batch} < train.global_batch={sched.global_batch}); "
                         "use compile_mode=default or no accumulation")


def build_strategy(cfg, sched, optim) -> Strategy:
    """ddp | fsdp | zero1 | zero2 | zero3 -> a Strategy (cfg: StrategyConfig, sched: ScheduleConfig, optim: OptimConfig)."""
    check_compile(cfg, sched)
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
