"""Evaluation: every rank predicts its part of the eval split; AUC over all ranks' predictions.

    result = evaluate(model, eval_loader, ctx)     # {"auc": ..., "logloss": ..., "rows": ...}
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.data.loader import ParquetLoader
from distrec.trainer.dist import DistContext
from distrec.trainer.metrics import auc, gather_predictions, logloss


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
