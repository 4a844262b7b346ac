"""Optimizers: a torch optimizer for the dense MLPs, a fused sparse one for the embedding shards.

    dense_opt, sparse_opt = make_optimizers(cfg.optimizer, model)
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import OptimizerConfig
from sharding.optim import SparseOptimizer


def _dense(kind: str, params: list[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def make_optimizers(cfg: OptimizerConfig, model: nn.Module) -> list[torch.optim.Optimizer]:
    """``model`` is the unwrapped DLRM (it knows which parameters are embeddings)."""
    sparse = list(model.embeddings.parameters())
    return [_dense(cfg.dense, model.dense_parameters(), cfg.dense_lr, cfg.eps),
            SparseOptimizer(sparse, cfg.sparse, lr=cfg.sparse_lr, eps=cfg.eps)]
