"""The single-process models tests hold the DLRM and the sharded runtime against.

    model = DLRM(3, LocalEmbeddings(specs), [16, 8], [12, 6])
    ref = ReferenceDLRM.from_model(model)      # same weights, written the obvious way
    torch.testing.assert_close(ref(dense, jagged), model(dense, jagged))

``LocalEmbeddings`` keeps every table in this process (fused per dim); ``ReferenceDLRM`` uses one
``nn.EmbeddingBag`` per table, a Python loop over tables and over feature pairs, the MLPs' layers
written out (x W^T + b, batch and layer norm by their formulas, ReLU, dropout) and the FM term as its
sum over pairs: slow and obviously right. Its batch norm normalises with the batch's statistics in
train mode and the running ones in eval mode, but never updates them (it checks one forward).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from distrec.config import TableSpec
from distrec.model.dlrm import DLRM, CatInteraction, DotInteraction
from distrec.model.embedding import check_ids
from sharding.jagged import JaggedBatch


def init_table_(weight: torch.Tensor, num_rows: int, init: str = "uniform", std: float = 0.0) -> None:
    """DLRM's initialisation, uniform in +-sqrt(1 / rows) (tables.init's default), or normal, or zeros."""
    if init == "zeros":
        nn.init.zeros_(weight)
    elif init == "normal":
        nn.init.normal_(weight, 0.0, std)
    else:
        bound = math.sqrt(1.0 / num_rows)
        nn.init.uniform_(weight, -bound, bound)


def _normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, m: nn.Module) -> torch.Tensor:
    return (x - mean) / torch.sqrt(var + m.eps) * m.weight + m.bias


def reference_mlp(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers`` (distrec.model.dlrm.mlp) applied one formula at a time."""
    for m in layers:
        if isinstance(m, nn.Linear):
            x = x @ m.weight.T + m.bias
        elif isinstance(m, nn.BatchNorm1d):
            batch = m.training
            x = _normalise(x, x.mean(0) if batch else m.running_mean,
                           x.var(0, unbiased=False) if batch else m.running_var, m)
        elif isinstance(m, nn.LayerNorm):
            x = _normalise(x, x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True), m)
        elif isinstance(m, nn.ReLU):
            x = x.clamp_min(0)
        elif isinstance(m, nn.Dropout):
            # The same draw as nn.Dropout makes (one bernoulli mask over x), so a seeded run matches.
            x = F.dropout(x, m.p, m.training)
        else:
            raise TypeError(f"reference_mlp: no formula for {type(m).__name__}")
    return x


class LocalEmbeddings(nn.Module):
    """Every table in this process; all tables of one dim looked up with a single ``embedding_bag`` call
    over one concatenated weight.

        emb = LocalEmbeddings(specs); pooled = emb(batch.sparse)     # [batch, sum of dims]
    """

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.specs]

    def __init__(self, specs: list[TableSpec], device: torch.device | str = "cpu"):
        super().__init__()
        self.specs = list(specs)
        self.groups = sorted({s.dim for s in specs})  # one fused weight per distinct dim
        self.weights = nn.ParameterList()
        for dim in self.groups:
            members = [s for s in specs if s.dim == dim]
            weight = torch.empty(sum(s.num_rows for s in members), dim, device=device)
            start = 0
            for s in members:
                init_table_(weight[start:start + s.num_rows], s.num_rows, s.init, s.init_std)
                start += s.num_rows
            self.weights.append(nn.Parameter(weight))
        self.mode = "mean" if specs and specs[0].pooling == "mean" else "sum"

    def _row_offsets(self, dim: int) -> list[int]:
        rows = [s.num_rows for s in self.specs if s.dim == dim]
        return [sum(rows[:i]) for i in range(len(rows))]

    def table_weight(self, index: int) -> torch.Tensor:
        """Table ``index``'s rows (a view into its fused weight)."""
        spec = self.specs[index]
        g = self.groups.index(spec.dim)
        pos = [s for s in self.specs if s.dim == spec.dim].index(spec)
        start = self._row_offsets(spec.dim)[pos]
        return self.weights[g][start:start + spec.num_rows]

    def forward(self, sparse: JaggedBatch) -> torch.Tensor:
        check_ids(sparse, self.specs)
        batch = sparse.batch_size
        vals, lens, wts = sparse.per_key()
        out: list[torch.Tensor | None] = [None] * len(self.specs)
        for g, dim in enumerate(self.groups):
            idx = [i for i, s in enumerate(self.specs) if s.dim == dim]
            shift = [torch.full_like(vals[i], off) for i, off in zip(idx, self._row_offsets(dim))]
            ids = torch.cat([vals[i] for i in idx]) + torch.cat(shift) if idx else sparse.values[:0]
            offsets = torch.cat([lens.new_zeros(1), torch.cumsum(lens[idx].reshape(-1), 0)])
            psw = torch.cat([wts[i] for i in idx]) if wts is not None else None
            pooled = F.embedding_bag(ids, self.weights[g], offsets[:-1], mode=self.mode,
                                     per_sample_weights=psw, include_last_offset=False)
            for j, i in enumerate(idx):
                out[i] = pooled[j * batch:(j + 1) * batch]
        return torch.cat(out, dim=1)


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
        self.kind = "dot" if isinstance(model.interaction, DotInteraction) else \
            "cat" if isinstance(model.interaction, CatInteraction) else "dcn"
        self.cross = copy.deepcopy(model.interaction) if self.kind == "dcn" else None
        self.fm = copy.deepcopy(model.fm.linear) if model.fm is not None else None

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

    def fm_term(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """w . concat(v_f) + sum over pairs f > g of <v_f, v_g>."""
        pairs = [(feats[i] * feats[j]).sum(1) for i in range(len(feats)) for j in range(i)]
        return torch.cat(feats, 1) @ self.fm.weight[0] + sum(pairs)

    def forward(self, dense: torch.Tensor, sparse: JaggedBatch) -> torch.Tensor:
        feats = self.pooled(sparse)
        x = reference_mlp(self.bottom, dense) if self.bottom is not None else None
        if self.kind == "dcn":
            top_in = self.cross(x, torch.cat(feats, 1), feats[0].shape[1])
        elif self.kind == "cat":
            top_in = torch.cat(([x] if x is not None else []) + feats, 1)
        else:
            vectors = ([x] if x is not None else []) + feats
            dots = [(vectors[i] * vectors[j]).sum(1) for i in range(len(vectors)) for j in range(i)]
            top_in = torch.stack(dots, 1)
            if x is not None:
                top_in = torch.cat([x, top_in], 1)
        logit = reference_mlp(self.top, top_in).squeeze(1)
        return logit if self.fm is None else logit + self.fm_term(feats)
