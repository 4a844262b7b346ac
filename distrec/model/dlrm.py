"""DLRM: bottom MLP over dense features, pooled embeddings, dot (or DCN-v2) interaction, top MLP.

    model = DLRM.from_config(cfg, ShardedEmbeddingCollection(tables, plan, rank=0))
    logits = model(batch.dense, batch.sparse)       # [batch]

With no dense features the bottom MLP is absent and only the embeddings interact.
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import Config
from distrec.model.embedding import EmbeddingPart
from sharding.jagged import JaggedBatch


def mlp(sizes: list[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or relu_last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DotInteraction(nn.Module):
    """Pairwise dot products of the F feature vectors (i > j), after the dense vector if any."""

    def __init__(self, num_features: int):
        super().__init__()
        rows, cols = torch.tril_indices(num_features, num_features, offset=-1)
        # One flat index: index_select (and its index_add backward) is much faster than z[:, rows, cols].
        self.register_buffer("pairs", rows * num_features + cols, persistent=False)

    @staticmethod
    def out_size(num_features: int, dense_size: int) -> int:
        return num_features * (num_features - 1) // 2 + dense_size

    def forward(self, dense: torch.Tensor | None, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        feats = pooled.view(pooled.shape[0], pooled.shape[1] // dim, dim)  # -1 fails on 0 rows
        if dense is not None:
            feats = torch.cat([dense.unsqueeze(1), feats], dim=1)
        z = torch.bmm(feats, feats.transpose(1, 2)).flatten(1).index_select(1, self.pairs)
        return z if dense is None else torch.cat([dense, z], dim=1)


class CrossInteraction(nn.Module):
    """DCN-v2: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l; W_l = U_l V_l when low_rank > 0."""

    def __init__(self, width: int, layers: int, low_rank: int):
        super().__init__()

        def weight() -> nn.Module:
            if low_rank:
                return nn.Sequential(nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width))
            return nn.Linear(width, width)

        self.layers = nn.ModuleList(weight() for _ in range(layers))

    def forward(self, dense: torch.Tensor | None, pooled: torch.Tensor, dim: int) -> torch.Tensor:
        x0 = pooled if dense is None else torch.cat([dense, pooled], dim=1)
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class DLRM(nn.Module):
    def __init__(self, num_dense: int, embeddings: EmbeddingPart, bottom_mlp: list[int], top_mlp: list[int],
                 interaction: str = "dot", dcn_layers: int = 2, dcn_low_rank: int = 0):
        super().__init__()
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom_mlp], relu_last=True) if num_dense else None
        dense_size = bottom_mlp[-1] if num_dense else 0
        self.dim = embeddings.dims[0]
        if interaction == "dot":
            self.interaction = DotInteraction(len(embeddings.dims) + (1 if num_dense else 0))
            top_in = DotInteraction.out_size(len(embeddings.dims) + (1 if num_dense else 0), dense_size)
        else:
            top_in = dense_size + sum(embeddings.dims)
            self.interaction = CrossInteraction(top_in, dcn_layers, dcn_low_rank)
        self.top = mlp([top_in, *top_mlp, 1], relu_last=False)

    @staticmethod
    def from_config(cfg: Config, embeddings: EmbeddingPart) -> "DLRM":
        m = cfg.model
        return DLRM(len(cfg.schema.dense), embeddings, m.bottom_mlp, m.top_mlp, m.interaction,
                    m.dcn_layers, m.dcn_low_rank)

    def dense_parameters(self) -> list[nn.Parameter]:
        skip = {id(p) for p in self.embeddings.parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def forward(self, dense: torch.Tensor, sparse: JaggedBatch) -> torch.Tensor:
        bottom = self.bottom(dense) if self.bottom is not None else None
        pooled = self.embeddings(sparse)
        return self.top(self.interaction(bottom, pooled, self.dim)).squeeze(1)
