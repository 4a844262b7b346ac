"""Process-group set-up: torch.distributed from the torchrun environment, or Horovod under horovodrun;
one plain process when there is neither.

    ctx = init_distributed("auto")               # under torchrun: gloo on CPU, NCCL on GPU
    ctx = init_distributed("cpu", "horovod")     # under horovodrun: Horovod (Gloo controller here)
    ctx.rank, ctx.world_size, ctx.device, ctx.group   # group: what the sharded runtime exchanges over

The trainer's few collectives outside the hot path (metric sums, eval gathers, checkpoint barriers) go
through the helpers here, so they follow whichever engine runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distrec.config import ConfigError
from sharding.comm import close_process_group, init_process_group

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" | "nccl" | "horovod" | "none" (one process, no process group)
    group: object = None  # for the sharded runtime: None (torch's default group) or a HorovodGroup

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


def import_horovod():
    """horovod.torch, or a ConfigError that says how to get it."""
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ConfigError(f"dense.engine = 'horovod' but Horovod is not importable ({e}); install it with "
                          "launch/install_horovod.sh (builds Horovod 0.28.1 for this torch) and run under "
                          "horovodrun, e.g. launch/horovodrun.sh 2 configs/demo.toml") from None
    return hvd


def _init_horovod(device_pref: str) -> DistContext:
    from sharding.comm import HorovodGroup

    hvd = import_horovod()
    hvd.init()
    device = pick_device(device_pref, hvd.local_rank())
    return DistContext(hvd.rank(), hvd.size(), hvd.local_rank(), device, "horovod", HorovodGroup())


def init_distributed(device_pref: str = "auto", engine: str = "ddp") -> DistContext:
    if engine == "horovod":
        return _init_horovod(device_pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return DistContext(0, 1, 0, device, "none")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ctx.backend == "horovod":
        t = ctx.group.hvd.allreduce(t, op=ctx.group.hvd.Sum)
    elif ctx.backend != "none":
        t = t.to(ctx.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if ctx.backend == "horovod":
        return ctx.group.hvd.allgather_object(obj)
    if ctx.backend == "none":
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's [rows, ...] tensor concatenated in rank order (row counts may differ)."""
    if ctx.backend == "horovod":
        return ctx.group.hvd.allgather(t)
    if ctx.backend == "none":
        return t
    return torch.cat([torch.as_tensor(p) for p in all_gather_object(t, ctx)])


def barrier(ctx: DistContext) -> None:
    if ctx.backend == "horovod":
        ctx.group.hvd.barrier()
    elif ctx.backend != "none":
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.backend == "horovod":
        ctx.group.hvd.shutdown()
    elif ctx.backend != "none":
        close_process_group()
