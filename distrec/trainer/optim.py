"""Optimizers: a torch optimizer for the dense MLPs, the embedding collection's fused sparse one.

    embeddings = ShardedEmbeddingCollection(tables, plan, optim=sparse_spec(cfg.optimizer), ...)
    dense_opt, sparse_opt = make_optimizers(cfg.optimizer, model)
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import OptimizerConfig
from sharding.optim import OptimSpec
from sharding.runtime import EmbeddingOptimizer


def dense_optimizer(kind: str, params: list[nn.Parameter], lr: float, eps: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``kind`` is one of config.DENSE_OPTIMIZERS: the trainer's MLPs and the PS servers' dense copy.

        dense_optimizer("adam", list(mlp.parameters()), lr=1e-3, eps=1e-8, weight_decay=0.01)  # AdamW

    ``weight_decay`` (optimizer.dense_weight_decay): decoupled for adam (torch AdamW:
    w -= lr * wd * w beside the Adam step), L2 added to the gradient for sgd and adagrad (torch's
    ``weight_decay``). At 0, adam stays torch Adam, so runs without it are unchanged."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=eps, weight_decay=weight_decay)
    if weight_decay:
        return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def sparse_spec(cfg: OptimizerConfig) -> OptimSpec:
    return OptimSpec(cfg.sparse, lr=cfg.sparse_lr, eps=cfg.eps, l2=cfg.sparse_l2)


def make_optimizers(cfg: OptimizerConfig, model: nn.Module) -> list:
    """``model`` is the unwrapped DLRM whose embeddings were built with ``optim=sparse_spec(cfg)``."""
    dense = dense_optimizer(cfg.dense, model.dense_parameters(), cfg.dense_lr, cfg.eps, cfg.dense_weight_decay)
    return [dense, EmbeddingOptimizer(model.embeddings)]
