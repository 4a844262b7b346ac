"""The pieces of the training loop: one step, evaluation, and the resumable training state.

    loss_sum = train_step(ddp_model, embeddings, optimizers, batch.to(device), global_size=8192)
    result = evaluate(model, eval_loader, ctx)   # exact AUC over all ranks' predictions
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distrec.checkpoint import Checkpoint
from distrec.data.loader import Batch, ParquetLoader
from distrec.dist import DistContext
from distrec.metrics import auc, gather_predictions, logloss
from sharding.checkpoint import export_shards, import_shards
from sharding.runtime import InputDist


@dataclass
class Position:
    """Where training stands: the next global batch to train is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


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


@dataclass
class PipelinedBatch:
    """A batch whose ids are already on their way to their shards (``ShardedEmbeddingCollection``'s
    ``start_input_dist``); the model takes ``sparse`` as it takes a JaggedBatch."""

    dense: torch.Tensor
    sparse: InputDist
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def input_wait_s(self) -> float:
        """How long the lookup waited for the ids: about 0 when the exchange was hidden."""
        return self.sparse.wait_s


def pipelined(batches: Iterator[Batch], embeddings) -> Iterator[PipelinedBatch]:
    """Batch i+1's ids travel to their shards while batch i trains (what TorchRec's
    TrainPipelineSparseDist does). Every rank starts the same exchanges in the same order, so results
    equal the unpipelined loop."""
    current = None
    for batch in batches:
        upcoming = PipelinedBatch(batch.dense, embeddings.start_input_dist(batch.sparse), batch.labels)
        if current is not None:
            yield current
        current = upcoming
    if current is not None:
        yield current


@torch.no_grad()
def predict(model: nn.Module, loader: ParquetLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        probs.append(torch.sigmoid(model(batch.dense, batch.sparse)).float().cpu())
        labels.append(batch.labels.cpu())
    model.train(was_training)
    return torch.cat(probs) if probs else torch.zeros(0), torch.cat(labels) if labels else torch.zeros(0)


def evaluate(model: nn.Module, loader: ParquetLoader, ctx: DistContext) -> dict:
    probs, labels = gather_predictions(*predict(model, loader, ctx.device), ctx)
    return {"auc": auc(probs, labels), "logloss": logloss(probs, labels), "rows": int(labels.size)}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def training_state(model: nn.Module, embeddings, optimizers, pos: Position, ctx: DistContext,
                   config: dict) -> tuple[dict | None, dict]:
    """(what rank 0 saves for all: dense model and optimizer, position, config; None on other ranks,
    what this rank saves: its embedding shards with their global rows and columns, and its RNG state).
    Shards carry global offsets, so the state loads under another plan or world size."""
    own = {"shards": export_shards(embeddings), "rng": rng_state()}
    if not ctx.is_main:
        return None, own
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith("embeddings.")}
    return {"dense": dense, "dense_optimizer": optimizers[0].state_dict(), "position": vars(pos).copy(),
            "world_size": ctx.world_size, "config": config}, own


def restore(ckpt: Checkpoint, model: nn.Module, embeddings, optimizers, ctx: DistContext) -> Position:
    """Load a checkpoint saved under any plan and world size; each rank reads only the rank files that
    hold rows of its own shards."""
    common = ckpt.common
    missing, unexpected = model.load_state_dict(common["dense"], strict=False)
    if unexpected or any(not k.startswith("embeddings.") for k in missing):
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    optimizers[0].load_state_dict(common["dense_optimizer"])
    wanted = [(name, (s.row_start, s.row_end), (s.col_start, s.col_end)) for name, s, _, _ in embeddings.held_shards()]
    import_shards(embeddings, ckpt.pieces(wanted))
    if ctx.rank < ckpt.world_size:  # same rank, same random stream as before the stop
        set_rng_state(ckpt.rank_state(ctx.rank)["rng"])
    return Position(**common["position"])
