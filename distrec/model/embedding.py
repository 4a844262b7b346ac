"""The embedding part of the model, behind one interface: ``dims`` and ``forward(JaggedBatch)``.

    emb = LocalEmbeddings(table_specs(cfg))
    pooled = emb(batch.sparse)        # [batch, sum of dims], features in table order

The trainer uses ``sharding.runtime.ShardedEmbeddingCollection``, which has the same interface.
``LocalEmbeddings`` keeps every table in this process and looks up all tables of one dim with a single
``embedding_bag`` call over one concatenated weight; with ``ReferenceDLRM`` it is the single-process
model that tests hold the DLRM against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distrec.config import TableSpec
from sharding.jagged import JaggedBatch


class IdRangeError(ValueError):
    """An id outside its table, naming the feature and the table."""


class EmbeddingPart(nn.Module):
    """Pools each feature's bag with its table; output columns follow ``specs`` order."""

    specs: list[TableSpec]

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.specs]

    def forward(self, sparse: JaggedBatch) -> torch.Tensor:  # [B, sum(dims)]
        raise NotImplementedError


def init_table_(weight: torch.Tensor, num_rows: int) -> None:
    """DLRM's initialisation: uniform in +-sqrt(1 / rows)."""
    bound = math.sqrt(1.0 / num_rows)
    nn.init.uniform_(weight, -bound, bound)


def check_ids(sparse: JaggedBatch, specs: list[TableSpec]) -> None:
    """Raise IdRangeError for an id < 0 or >= its table's rows (before torch's own opaque index error)."""
    per_key = torch.split(sparse.values, sparse.length_per_key())
    for spec, ids in zip(specs, per_key):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_rows):
            bad = ids[(ids < 0) | (ids >= spec.num_rows)][0].item()
            raise IdRangeError(f"feature {spec.name}: id {bad} is out of range for table {spec.name} "
                               f"with {spec.num_rows} rows")


class LocalEmbeddings(EmbeddingPart):
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
                init_table_(weight[start:start + s.num_rows], s.num_rows)
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
