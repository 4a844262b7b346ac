"""One training step on this rank's part of a global batch.

    loss_sum = train_step(ddp_model, embeddings, optimizers, batch.to(device), global_size=8192)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distrec.data.loader import Batch
from distrec.trainer.pipeline import PipelinedBatch


def train_step(model: nn.Module, embeddings, optimizers: list[torch.optim.Optimizer], batch: "Batch | PipelinedBatch",
               global_size: int) -> float:
    """One step on this rank's part of a global batch of ``global_size`` rows; returns the local loss sum.

    Each rank's loss is its share of the global-batch mean and every gradient is summed over ranks (DDP
    with a summing hook, the reversed all-to-all for shards, an all-reduce for replicas), so the result
    is the gradient of the global mean also when the last partial batch gives ranks unequal rows."""
    logits = model(batch.dense, batch.sparse)
    loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
    (loss_sum / global_size).backward()
    embeddings.sync_replica_grads()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()  # set_to_none by default; Horovod's DistributedOptimizer takes no argument
    return float(loss_sum.detach())
