"""The dense part's data parallelism: gradients summed over ranks by DDP, or by Horovod.

    model_to_call, optimizers = wrap_dense(model, optimizers, ctx)     # ctx.engine picks the wrapper

Embedding shards differ per rank and get their gradients by all-to-all (shards) or all-reduce (replicas)
in the sharded runtime, so both wrappers leave them alone. Gradients are summed, not averaged: each
rank's loss is already its share of the global-batch mean (see ``step.train_step``).
"""
from __future__ import annotations

import time

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sharding.rounding import DTYPES


def wrap_dense(model: nn.Module, optimizers: list, ctx, timer=None, comm_precision: str = "fp32") -> tuple[nn.Module, list]:
    """(model to call, optimizers) for ``ctx`` (a DistContext); ``timer`` (a PhaseTimer) adds each
    gradient bucket's all-reduce to the profile; ``comm_precision`` ("fp32", "bf16": plan.dense_comm_precision)
    is what the gradients travel as."""
    return ctx.engine.wrap_dense(model, optimizers, timer, comm_precision)


def _sum_gradients(state, bucket):  # unannotated: DDP checks annotations, which are strings here
    """DDP communication hook: sum over ranks instead of averaging. ``state`` = (timer or None, dtype):
    the bucket travels and is summed as ``dtype`` (bf16 halves the bytes; DDP's bf16_compress_hook does the
    same but averages), then is written back into the fp32 bucket; a timer hears the all-reduce's time."""
    timer, dtype = state
    start, buffer = time.perf_counter(), bucket.buffer()
    sent = buffer if buffer.dtype == dtype else buffer.to(dtype)

    def done(f):
        if timer is not None:
            timer.add("grad_allreduce", time.perf_counter() - start)
        return f.value()[0] if sent is buffer else buffer.copy_(f.value()[0])
    return dist.all_reduce(sent, async_op=True).get_future().then(done)


def ddp_dense(model: nn.Module, optimizers: list, timer=None, comm_precision: str = "fp32") -> tuple[nn.Module, list]:
    # Buffers too: DDP would otherwise broadcast rank 0's kernel metadata (fbgemm's row offsets) to all.
    ignore = [f"embeddings.{name}" for name, _ in [*model.embeddings.named_parameters(),
                                                    *model.embeddings.named_buffers()]]
    DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
    ddp = DDP(model)
    ddp.register_comm_hook((timer, DTYPES[comm_precision]), _sum_gradients)
    return ddp, optimizers


def horovod_dense(model: nn.Module, optimizers: list, hvd) -> tuple[nn.Module, list]:
    """Horovod's DistributedOptimizer around the dense optimizer (``optimizers[0]``)."""
    dense = [(n, p) for n, p in model.named_parameters() if not n.startswith("embeddings.")]
    hvd.broadcast_parameters(dict(dense), root_rank=0)  # as DDP does when it wraps the model
    return model, [hvd.DistributedOptimizer(optimizers[0], named_parameters=dense, op=hvd.Sum), *optimizers[1:]]
