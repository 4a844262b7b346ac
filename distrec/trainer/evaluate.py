"""Evaluation: every rank predicts its part of the eval split; metrics over all ranks' predictions.

    result = evaluate(model, eval_loader, ctx)     # {"auc": ..., "logloss": ..., "rows": ...}
    evaluate(model, loader, ctx, calibration=True)  # also mean_prediction, click_rate and their ratio

The gathered predictions are put back in the split's stream order (global batch by global batch, each
rank's slice in rank order), so the metrics are computed over the same rows in the same order on any
world size: on the same weights and world size they are equal to the last bit.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from distrec.data.loader import ParquetLoader
from distrec.trainer.dist import DistContext, all_gather_object
from distrec.trainer.metrics import auc, gather_predictions, logloss


@torch.no_grad()
def predict(model: nn.Module, loader: ParquetLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(probabilities, labels, rows per batch) of this rank's slices."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for batch in loader.epoch(0):
        batch = batch.to(device)
        probs.append(torch.sigmoid(model(batch.dense, batch.sparse)).float().cpu())
        labels.append(batch.labels.cpu())
    model.train(was_training)
    sizes = [len(p) for p in probs]
    return (torch.cat(probs) if probs else torch.zeros(0), torch.cat(labels) if labels else torch.zeros(0), sizes)


def stream_order(sizes_per_rank: list[list[int]]) -> np.ndarray:
    """Indices into rows gathered rank by rank that put them in stream order (batch b: rank 0's slice,
    rank 1's, ...). ``stream_order([[2, 1], [2, 1]])`` -> ``[0, 1, 3, 4, 2, 5]``."""
    starts = np.cumsum([0] + [sum(s) for s in sizes_per_rank])[:-1]
    offsets = [np.cumsum([0] + s) for s in sizes_per_rank]
    batches = max((len(s) for s in sizes_per_rank), default=0)
    return np.concatenate([np.arange(starts[r] + offsets[r][b], starts[r] + offsets[r][b + 1])
                           for b in range(batches) for r, s in enumerate(sizes_per_rank) if b < len(s)]
                          or [np.zeros(0, dtype=np.int64)])


def evaluate(model: nn.Module, loader: ParquetLoader, ctx: DistContext, calibration: bool = False) -> dict:
    probs, labels, sizes = predict(model, loader, ctx.device)
    probs, labels = gather_predictions(probs, labels, ctx)
    order = stream_order(all_gather_object(sizes, ctx)) if ctx.world_size > 1 else slice(None)
    probs, labels = probs[order], labels[order]
    result = {"auc": auc(probs, labels), "logloss": logloss(probs, labels), "rows": int(labels.size)}
    if calibration:
        mean_p, rate = float(np.mean(probs, dtype=np.float64)), float(np.mean(labels, dtype=np.float64))
        result.update(mean_prediction=mean_p, click_rate=rate, calibration=mean_p / rate if rate else float("nan"))
    return result
