"""The pieces of the training loop: one step, evaluation, and the resumable training state.

    loss_sum = train_step(ddp_model, optimizers, batch.to(device), world_size=2)
    result = evaluate(model, eval_loader, ctx)   # exact AUC over all ranks' predictions
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distrec.data.loader import Batch, ParquetLoader
from distrec.dist import DistContext
from distrec.metrics import auc, gather_predictions, logloss


@dataclass
class Position:
    """Where training stands: the next global batch to train is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def train_step(model: nn.Module, optimizers: list[torch.optim.Optimizer], batch: Batch, global_size: int,
               world_size: int) -> float:
    """One step on this rank's part of a global batch of ``global_size`` rows; returns the local loss sum."""
    logits = model(batch.dense, batch.sparse)
    loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
    # DDP averages gradients over ranks; this scale makes the result the gradient of the global-batch mean,
    # also when the last partial batch gives ranks unequal row counts.
    (loss_sum * (world_size / global_size)).backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(loss_sum.detach())


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
    probs, labels = gather_predictions(*predict(model, loader, ctx.device))
    return {"auc": auc(probs, labels), "logloss": logloss(probs, labels), "rows": int(labels.size)}


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def training_state(model: nn.Module, optimizers, pos: Position, ctx: DistContext, config: dict) -> dict:
    """Everything a resumed run needs; every rank's RNG state is gathered (collective: all ranks call)."""
    rngs = [rng_state()]
    if ctx.backend != "none":
        rngs = [None] * ctx.world_size
        dist.all_gather_object(rngs, rng_state())
    return {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
            "position": vars(pos).copy(), "rng": rngs, "world_size": ctx.world_size, "config": config}


def restore(state: dict, model: nn.Module, optimizers, ctx: DistContext) -> Position:
    model.load_state_dict(state["model"])
    for opt, s in zip(optimizers, state["optimizers"]):
        opt.load_state_dict(s)
    if ctx.rank < len(state["rng"]):
        set_rng_state(state["rng"][ctx.rank])
    return Position(**state["position"])
