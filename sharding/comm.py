"""All-to-all exchanges for the sharded runtime, differentiable where gradients flow back.

    out = all_to_all(flat, send_splits=[6, 2], recv_splits=[6, 4], group=None)   # autograd-aware
    flight = AsyncAllToAll(flat, [6, 2], [6, 4], group=None)   # the same, started
    ...                                                           # work that does not need it
    out = flight.wait()                                           # its gradients overlap likewise

With one rank (no process group) every exchange is the identity, so the runtime needs no special case.
``group`` is a torch.distributed process group (None: the default one) or a ``HorovodGroup``.
"""
from __future__ import annotations

import gc
import time

import torch
import torch.distributed as dist


def init_process_group(backend: str, **kwargs) -> None:
    """``torch.distributed.init_process_group``, so that ``close_process_group`` can free the group.

        init_process_group("gloo", rank=rank, world_size=2, store=dist.FileStore(path, 2))
    """
    # Importing torch._dynamo once a group exists (DDP's constructor does) leaves a reference to the
    # group that destroy_process_group does not drop; imported first, it holds none.
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend, **kwargs)


def close_process_group() -> None:
    """Destroy every group and free them now: their worker threads are joined here, while the
    interpreter runs. Left to the interpreter's exit, a gloo worker still releasing a finished
    collective's tensors needs the GIL after it is gone, and the process aborts ("terminate called
    without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the groups' last references may sit in reference cycles (DDP's hooks)


class HorovodGroup:
    """Pass as ``group`` to run the exchanges with Horovod (``hvd.alltoall``, ``hvd.allreduce``) instead of
    torch.distributed: the arrangement of NVIDIA's SOK. ``hvd.init()`` must have run.

        emb = ShardedEmbeddingCollection(tables, plan, rank=hvd.rank(), group=HorovodGroup())
    """

    def __init__(self):
        import horovod.torch as hvd

        self.hvd = hvd


class _HorovodWork:
    """An async Horovod all-to-all, waited on like torch.distributed's Work: fills ``out`` on wait."""

    def __init__(self, hvd, handle, out: torch.Tensor):
        self.hvd, self.handle, self.out = hvd, handle, out

    def wait(self) -> None:
        received, _ = self.hvd.synchronize(self.handle)
        with torch.no_grad():  # out may be an autograd output (AsyncAllToAll): filling it is no op of the graph
            self.out.copy_(received)


def world_size(group) -> int:
    if isinstance(group, HorovodGroup):
        return group.hvd.size()
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def exchange(t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` of a 1-D tensor: rank r's piece ``i`` goes to rank ``i``."""
    out, work = start_exchange(t, send_splits, recv_splits, group)
    if work is not None:
        work.wait()
    return out


def start_exchange(t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
    """The same, started: returns (output, work to wait on, or None when already done)."""
    if world_size(group) == 1:
        return t, None
    out = t.new_empty(sum(recv_splits))
    if isinstance(group, HorovodGroup):
        splits = torch.tensor(send_splits, dtype=torch.int32)  # Horovod takes int32 splits only
        return out, _HorovodWork(group.hvd, group.hvd.alltoall_async(t.contiguous(), splits=splits), out)
    work = dist.all_to_all_single(out, t.contiguous(), recv_splits, send_splits, group=group, async_op=True)
    return out, work


class _AllToAll(torch.autograd.Function):
    """Forward sends pieces to their ranks; backward sends their gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, t, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(t, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(t, send_splits, recv_splits, group)


class Exchange:
    """An all-to-all started and not yet waited on (``start_exchange``), timed: after ``wait()``,
    ``waited_s`` is how long the wait blocked and ``flight_s`` how long the exchange was in flight
    (from its start to the end of the wait), so ``flight_s - waited_s`` of it was hidden behind other
    work; ``call_s`` is what starting it cost.

        ex = Exchange(flat, [6, 2], [6, 4], group); other_work(); received = ex.wait()
    """

    def __init__(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        begin = time.perf_counter()
        self.out, self.work = start_exchange(t, send_splits, recv_splits, group)
        self.started = time.perf_counter()
        self.call_s, self.waited_s, self.flight_s = self.started - begin, 0.0, 0.0

    def wait(self) -> torch.Tensor:
        begin = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        end = time.perf_counter()
        self.waited_s, self.flight_s = end - begin, end - self.started
        return self.out


class AsyncAllToAll:
    """The differentiable all-to-all in two halves, so that work that does not depend on it runs while
    it is in flight, in forward and in backward:

        flight = AsyncAllToAll(pooled.reshape(-1), send_splits, recv_splits, group, report=None)
        bottom = bottom_mlp(dense)          # runs while the pooled vectors fly
        received = flight.wait()            # [sum(recv_splits)], differentiable

    Backward runs the halves reversed: the gradient of ``received`` starts the reverse exchange (the
    ``wait`` half's backward), and the gradient of the input waits for it (the start half's backward).
    The autograd engine runs ready nodes latest-created first, so whatever was created between the two
    halves in forward (the bottom MLP's backward, and DDP's all-reduce of its gradients) runs while the
    gradients fly. ``report(name, exchange)``, if given, hears each finished exchange: "output_a2a"
    (forward) and "grad_a2a" (backward). ``wait`` once: its result is the only consumer of the start.

    ``dtypes`` = (forward, backward): what the values and their gradients travel as (fp16/bf16 halve the
    bytes, TorchRec's quantized comms); both sides of the exchange see fp32, so the sums after it (row-wise
    partial sums, gradients of duplicate ids) are fp32.
    """

    def __init__(self, t: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None,
                 report=None, dtypes: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32)):
        self.splits, self.group, self.report, self.dtypes = (send_splits, recv_splits), group, report, dtypes
        self.forward_ex: Exchange | None = None
        self.backward_ex: Exchange | None = None
        self._sent = _StartAllToAll.apply(t, self)

    def wait(self) -> torch.Tensor:
        sent, self._sent = self._sent, None  # held by the graph from here on: no cycle through this handle
        return _FinishAllToAll.apply(sent, self)

    def _heard(self, name: str, ex: Exchange) -> None:
        if self.report is not None:
            self.report(name, ex)


class _StartAllToAll(torch.autograd.Function):
    """Forward: start the exchange, return the buffer it fills. Backward: wait for the gradients' one."""

    @staticmethod
    def forward(ctx, t, flight):
        ctx.flight, ctx.dtype = flight, t.dtype
        flight.forward_ex = Exchange(t.to(flight.dtypes[0]), *flight.splits, flight.group)
        return flight.forward_ex.out

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        got = flight.backward_ex.wait()  # ``grad`` is a stand-in (see _FinishAllToAll.backward)
        flight._heard("grad_a2a", flight.backward_ex)
        flight.backward_ex = None  # the buffer goes with the graph, not with the handle
        return got.to(ctx.dtype), None


class _FinishAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: start the reverse one."""

    @staticmethod
    def forward(ctx, sent, flight):
        ctx.flight = flight
        received = flight.forward_ex.wait()
        flight._heard("output_a2a", flight.forward_ex)
        flight.forward_ex = None
        return received.float()

    @staticmethod
    def backward(ctx, grad):
        flight = ctx.flight
        send_splits, recv_splits = flight.splits
        flight.backward_ex = Exchange(grad.to(flight.dtypes[1]), recv_splits, send_splits, flight.group)
        # The start half's backward takes the exchanged gradient from the handle; what flows to it here
        # only has to have the received shape and dtype: ``grad`` itself (read by the exchange, written by
        # no one), or with half exchanges a broadcast zero of that dtype (no copy).
        if flight.dtypes[0] != grad.dtype:
            return torch.zeros((), dtype=flight.dtypes[0], device=grad.device).expand(grad.shape), None
        return grad, None


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    if isinstance(group, HorovodGroup):
        group.hvd.allreduce_(t, op=group.hvd.Sum)
    elif world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t
