"""A plain single-process DLRM written the obvious way, kept as the reference in tests.

    ref = ReferenceDLRM.from_model(model)      # same weights as a DLRM with LocalEmbeddings
    torch.testing.assert_close(ref(dense, per_feature_ids), model(dense, jagged))

One ``nn.EmbeddingBag`` per table, a Python loop over tables and over feature pairs: slow and
obviously right; the fused model and, later, the sharded runtime are held against it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from distrec.model.dlrm import DLRM, DotInteraction
from distrec.model.embedding import LocalEmbeddings
from sharding.jagged import JaggedBatch


class ReferenceDLRM(nn.Module):
    def __init__(self, model: DLRM):
        super().__init__()
        emb = model.embeddings
        assert isinstance(emb, LocalEmbeddings)
        self.tables = nn.ModuleList()
        for i, spec in enumerate(emb.specs):
            bag = nn.EmbeddingBag(spec.num_rows, spec.dim, mode=emb.mode)
            bag.weight.data.copy_(emb.table_weight(i).detach())
            self.tables.append(bag)
        self.bottom = copy.deepcopy(model.bottom)
        self.top = copy.deepcopy(model.top)
        self.cross = None if isinstance(model.interaction, DotInteraction) else copy.deepcopy(model.interaction)

    @staticmethod
    def from_model(model: DLRM) -> "ReferenceDLRM":
        return ReferenceDLRM(model)

    def pooled(self, sparse: JaggedBatch) -> list[torch.Tensor]:
        out, start = [], 0
        batch = sparse.batch_size
        for t, bag in enumerate(self.tables):
            lengths = sparse.lengths[t * batch:(t + 1) * batch]
            ids = sparse.values[start:start + int(lengths.sum())]
            start += int(lengths.sum())
            offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)[:-1]])
            out.append(bag(ids, offsets))
        return out

    def forward(self, dense: torch.Tensor, sparse: JaggedBatch) -> torch.Tensor:
        feats = self.pooled(sparse)
        x = self.bottom(dense) if self.bottom is not None else None
        if self.cross is not None:
            return self.top(self.cross(x, torch.cat(feats, 1), feats[0].shape[1])).squeeze(1)
        vectors = ([x] if x is not None else []) + feats
        dots = [(vectors[i] * vectors[j]).sum(1) for i in range(len(vectors)) for j in range(i)]
        top_in = torch.stack(dots, 1)
        if x is not None:
            top_in = torch.cat([x, top_in], 1)
        return self.top(top_in).squeeze(1)
