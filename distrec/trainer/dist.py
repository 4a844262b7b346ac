"""Process-group set-up: torch.distributed from the torchrun environment, or Horovod under horovodrun;
one plain process when there is neither.

    ctx = init_distributed("auto")               # under torchrun: gloo on CPU, NCCL on GPU
    ctx = init_distributed("cpu", "horovod")     # under horovodrun: Horovod (Gloo controller here)
    ctx.rank, ctx.world_size, ctx.device, ctx.group   # group: what the sharded runtime exchanges over

The trainer's few collectives outside the hot path (metric sums, eval gathers, checkpoint barriers) and
the dense part's wrapper go through ``ctx.engine``, chosen once from the backend (``_engine``), so they
follow whichever engine runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from distrec.config import ConfigError
from distrec.trainer.dense_parallel import ddp_dense, horovod_dense
from sharding.comm import close_process_group, init_process_group

COLLECTIVE_TIMEOUT = timedelta(minutes=10)


class OneProcess:
    """The engine of a plain process: every collective is the identity."""

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather_object(self, obj) -> list:
        return [obj]

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def wrap_dense(self, model, optimizers: list, timer=None, comm_precision: str = "fp32"):
        return model, optimizers


class TorchDistributed(OneProcess):
    """torch.distributed (gloo or NCCL) under torchrun; the dense part under DDP."""

    def __init__(self, device: torch.device):
        self.device = device

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def all_gather_object(self, obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.as_tensor(p) for p in self.all_gather_object(t)])

    def barrier(self) -> None:
        dist.barrier()

    def shutdown(self) -> None:
        close_process_group()

    def wrap_dense(self, model, optimizers: list, timer=None, comm_precision: str = "fp32"):
        return ddp_dense(model, optimizers, timer, comm_precision)


class Horovod(OneProcess):
    """Horovod under horovodrun; the dense part under hvd.DistributedOptimizer."""

    def __init__(self, hvd):
        self.hvd = hvd

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allreduce(t, op=self.hvd.Sum)

    def all_gather_object(self, obj) -> list:
        return self.hvd.allgather_object(obj)

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return self.hvd.allgather(t)

    def barrier(self) -> None:
        self.hvd.barrier()

    def shutdown(self) -> None:
        self.hvd.shutdown()

    def wrap_dense(self, model, optimizers: list, timer=None, comm_precision: str = "fp32"):
        # config validation refuses bf16 here: Horovod compresses gradients to fp16 only
        return horovod_dense(model, optimizers, self.hvd)


def _engine(backend: str, device: torch.device, group):
    """The one place that decides between a plain process, torch.distributed and Horovod."""
    if backend == "none":
        return OneProcess()
    if backend == "horovod":
        return Horovod(group.hvd)
    return TorchDistributed(device)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" | "nccl" | "horovod" | "none" (one process, no process group)
    group: object = None  # for the sharded runtime: None (torch's default group) or a HorovodGroup
    engine: OneProcess = field(init=False, repr=False)  # the collectives, chosen from ``backend``

    def __post_init__(self):
        self.engine = _engine(self.backend, self.device, self.group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but torch sees no GPU; use 'cpu' or 'auto'")
        # More ranks on a node than GPUs (a check of the multi-rank paths on one GPU): they share them in turn
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def backend_for(device: torch.device, local_world: int) -> str:
    """NCCL for CUDA ranks with a GPU each; gloo on CPU, and for CUDA ranks sharing a GPU (NCCL refuses
    two ranks on one device; gloo exchanges CUDA tensors through host memory)."""
    if device.type != "cuda" or local_world > torch.cuda.device_count():
        return "gloo"
    return "nccl"


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
    backend = backend_for(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if not dist.is_initialized():
        init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    return ctx.engine.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    return ctx.engine.all_gather_object(obj)


def all_gather_rows(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's [rows, ...] tensor concatenated in rank order (row counts may differ)."""
    return ctx.engine.all_gather_rows(t)


def barrier(ctx: DistContext) -> None:
    ctx.engine.barrier()


def shutdown(ctx: DistContext) -> None:
    ctx.engine.shutdown()
