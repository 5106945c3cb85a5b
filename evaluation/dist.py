"""A tiny distributed facade for evaluation jobs; every call also works in a single plain process."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init(device: str = "auto") -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this rank's device."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        kw = {"device_id": dev} if want_cuda else {}   # binds NCCL to this GPU (barriers need no guessing)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(minutes=60), **kw)
    return dev


def shutdown() -> None:
    """Leave the process group (if any) cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()   # leave together: tearing gloo down while a peer still works can abort the peer
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def comm_device(device: torch.device) -> torch.device:
    """Where collective buffers must live: the GPU for NCCL, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kw) -> None:
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kw, flush=True)
