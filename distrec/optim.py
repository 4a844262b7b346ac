"""Optimizers: one for the dense MLPs, one for the embedding tables.

    dense_opt, sparse_opt = make_optimizers(cfg.optimizer, model)
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import OptimizerConfig


def _make(kind: str, params: list[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def make_optimizers(cfg: OptimizerConfig, model: nn.Module) -> list[torch.optim.Optimizer]:
    """``model`` is the unwrapped DLRM (it knows which parameters are embeddings)."""
    dense = model.dense_parameters()
    sparse = list(model.embeddings.parameters())
    return [_make(cfg.dense, dense, cfg.dense_lr, cfg.eps), _make(cfg.sparse, sparse, cfg.sparse_lr, cfg.eps)]
