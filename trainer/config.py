"""Typed training configuration: one dataclass per component, documented field by field.

Hydra composes YAML from configs/; trainer.train converts it once into ``TrainConfig`` (unknown keys
and wrong types are errors there), and nothing below the entry point sees a DictConfig.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_pipeline.digits import DigitsConfig
from modeling.objective import FlowMatchingConfig
from modeling.samplers import SamplerConfig


@dataclass
class ModelConfig:
    name: str = "FlowDCN-debug"                        # a key of modeling.MODELS
    overrides: dict[str, Any] = field(default_factory=dict)   # build_model(**overrides), e.g. {in_channels: 1}


@dataclass
class DataConfig:
    kind: str = "digits"                               # digits (built-in, pixel space) | latents (shards)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    latents: dict[str, Any] = field(default_factory=dict)     # data_pipeline.loader.LoaderConfig fields


@dataclass
class OptimConfig:
    lr: float = 1e-4                                   # official: AdamW 1e-4, wd 0, constant
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_nimg: int = 0                               # linear LR warm-up length in images
    grad_clip: float = 0.0                             # max global grad norm; 0 = off (official)
    # torch AdamW implementation: None = fused on CUDA (one kernel for all parameters; torchtitan's default, and what
    # bench/train_step.py measures), torch's own choice elsewhere; true/false force it on/off.
    fused: Optional[bool] = None


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup_steps: int = 0                              # >0: decay = min(decay, (1+n)/(10+n)) for n < warmup_steps


@dataclass
class StrategyConfig:
    name: str = "ddp"                                  # ddp (single process included) | fsdp | zero1 | zero2 | zero3
    backend: Optional[str] = None                      # process-group backend; None = nccl on GPU, gloo on CPU
    reshard_after_forward: bool = False                # fsdp: free unsharded blocks after forward (see fsdp.yaml)
    blocks_per_unit: int = 4                           # fsdp: consecutive blocks sharded (all-gathered) together
    reduce_bucket_size: int = 500_000_000              # zero
    offload_optimizer: bool = False                    # zero: CPU offload of optimizer state
    deepspeed_optimizer: bool = False                  # zero: DeepSpeed's fused AdamW instead of torch's


@dataclass
class ScheduleConfig:
    total_nimg: int = 100_000                          # end of training, in images seen
    global_batch: int = 256                            # images per optimizer step over all ranks
    micro_batch: int = 0                               # per-rank images per forward; 0 = no accumulation
    log_every_nimg: int = 10_000
    snapshot_every_nimg: int = 0                       # sample-grid PNG cadence; 0 = only at the end
    checkpoint_every_nimg: int = 50_000
    keep_last: int = 2                                 # complete checkpoints kept (newest)
    keep_every_nimg: int = 0                           # also keep checkpoints at multiples of this; 0 = none
    seed: int = 0
    precision: str = "bf16"                            # bf16 (autocast / FSDP mixed precision) | fp32
    compile: bool = False                              # torch.compile each block
    compile_mode: str = "default"                      # default | reduce-overhead, max-autotune (CUDA graphs: 1 process, no accumulation) | max-autotune-no-cudagraphs
    activation_checkpointing: bool = False
    on_nonfinite: str = "stop"                         # stop | skip (drop the step, keep going)
    deterministic: bool = False                        # torch.use_deterministic_algorithms: bitwise CPU resume; GPU: warn_only (MSDCN CUDA backward uses atomics)


@dataclass
class PreviewConfig:
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(solver="euler", steps=32, last_step=None))
    cfg_scale: float = 4.0
    per_class: int = 8                                 # grid rows per class
    num_classes_shown: int = 10
    seed: int = 0


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "flowdcn"
    wandb_mode: str = "offline"                        # offline unless you configure online
    progress: bool = True                              # tqdm progress bar on rank 0
    peak_tflops: float = 0.0                           # device peak for MFU; 0 = look up the GPU (none on CPU)


@dataclass
class SignalConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])   # save + exit on these
    exit_code: int = 3                                 # the launcher requeues on this code


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"                      # checkpoints, logs, samples; re-running resumes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    signals: SignalConfig = field(default_factory=SignalConfig)
    init_from: Optional[str] = None                    # previous stage: checkpoint dir or ema/model .safetensors
    demo_eval: bool = False                            # digits: report classifier accuracy of samples at the end
