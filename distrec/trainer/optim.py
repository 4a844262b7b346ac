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


def dense_optimizer(kind: str, params: list[nn.Parameter], lr: float, eps: float) -> torch.optim.Optimizer:
    """``kind`` is one of config.DENSE_OPTIMIZERS: the trainer's MLPs and the PS servers' dense copy."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=eps)
    return torch.optim.Adam(params, lr=lr, eps=eps)


def sparse_spec(cfg: OptimizerConfig) -> OptimSpec:
    return OptimSpec(cfg.sparse, lr=cfg.sparse_lr, eps=cfg.eps)


def make_optimizers(cfg: OptimizerConfig, model: nn.Module) -> list:
    """``model`` is the unwrapped DLRM whose embeddings were built with ``optim=sparse_spec(cfg)``."""
    return [dense_optimizer(cfg.dense, model.dense_parameters(), cfg.dense_lr, cfg.eps), EmbeddingOptimizer(model.embeddings)]
