"""A small distributed facade that also works in a single process (EDM2 / DiT style)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init(backend: str | None = None, timeout_s: int = 1800, require: bool = False) -> None:
    """Initialise the default process group once: when launched by torchrun/srun (WORLD_SIZE > 1), or for a
    single process too when ``require`` (FSDP2 and DeepSpeed need a group). Safe to call repeatedly."""
    if dist.is_initialized():
        return
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not require:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if launched:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:   # a plain `python` process: a private one-rank group
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    return torch.device("cuda", get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_dist():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in a single process); returns t."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, dev: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (used for signals and non-finite checks)."""
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    return bool(all_reduce_sum(t).item() > 0)


def destroy() -> None:
    """Leave together: a rank that tears gloo down while a peer is still working can abort the peer."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
