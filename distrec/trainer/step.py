"""One training step on this rank's part of a global batch.

    loss_sum = train_step(ddp_model, embeddings, optimizers, batch.to(device), global_size=8192)
    loss_sum = train_step(..., scaler=LossScale())   # train.precision = "fp16": loss scaling, skips
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distrec.data.loader import Batch
from distrec.trainer.loss_scale import LossScale
from distrec.trainer.pipeline import PipelinedBatch


def train_step(model: nn.Module, embeddings, optimizers: list[torch.optim.Optimizer], batch: "Batch | PipelinedBatch",
               global_size: int, scaler: LossScale | None = None) -> float:
    """One step on this rank's part of a global batch of ``global_size`` rows; returns the local loss sum.

    Each rank's loss is its share of the global-batch mean and every gradient is summed over ranks (DDP
    with a summing hook, the reversed all-to-all for shards, an all-reduce for replicas), so the result
    is the gradient of the global mean also when the last partial batch gives ranks unequal rows.

    With ``scaler`` (fp16) the loss is scaled before backward, the sparse updates wait (the embeddings
    were built with ``defer_updates``), and a step whose gradients overflowed on any rank changes nothing:
    no dense or sparse weight, no optimizer state (``scaler.skipped`` counts it)."""
    logits = model(batch.dense, batch.sparse)
    loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
    scale = scaler.scale if scaler is not None else 1.0
    (loss_sum * (scale / global_size)).backward()
    embeddings.sync_replica_grads()
    if scaler is not None and not scaler.finite(dense_grads(optimizers) + embeddings.grads(), embeddings.group):
        embeddings.discard()
        for opt in optimizers:
            opt.zero_grad()
        return float(loss_sum.detach())
    for opt in optimizers:
        opt.step()
        opt.zero_grad()  # set_to_none by default; Horovod's DistributedOptimizer takes no argument
    return float(loss_sum.detach())


def dense_grads(optimizers) -> list[torch.Tensor]:
    """The gradients the dense optimizers will apply (the embeddings' optimizer has no param groups)."""
    return [p.grad for opt in optimizers for group in getattr(opt, "param_groups", [])
            for p in group["params"] if p.grad is not None]
