"""torch.distributed set-up from the torchrun environment; one plain process when there is none.

    ctx = init_distributed("auto")     # under torchrun: gloo on CPU, NCCL on GPU
    ctx.rank, ctx.world_size, ctx.device
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" | "nccl" | "none" (one process, no process group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but torch sees no GPU; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return DistContext(0, 1, 0, device, "none")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ctx.backend != "none":
        t = t.to(ctx.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def shutdown(ctx: DistContext) -> None:
    if ctx.backend != "none" and dist.is_initialized():
        dist.destroy_process_group()
