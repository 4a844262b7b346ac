"""Which server holds which rows, and the embedding part of a worker's DLRM over rows it pulled.

    part = Partition("hash", servers=2)
    part.owner(torch.tensor([0, 1, 5]), num_rows=10)   # tensor([0, 1, 1])
    part.local(torch.tensor([0, 1, 5]), num_rows=10)   # tensor([0, 0, 2]): index in the owner's block
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distrec.config import TableSpec
from distrec.model.embedding import check_ids
from sharding.jagged import JaggedBatch


@dataclass(frozen=True)
class Partition:
    """``hash``: row r on server r % S (hot low ids spread out); ``range``: S contiguous blocks."""

    kind: str
    servers: int

    def _start(self, num_rows: int, server: int) -> int:
        return num_rows * server // self.servers

    def local_rows(self, num_rows: int, server: int) -> int:
        if self.kind == "hash":
            return max(0, (num_rows - server + self.servers - 1) // self.servers)
        return self._start(num_rows, server + 1) - self._start(num_rows, server)

    def owner(self, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
        if self.kind == "hash":
            return ids % self.servers
        starts = torch.tensor([self._start(num_rows, s) for s in range(1, self.servers)], dtype=ids.dtype)
        return torch.bucketize(ids, starts, right=True)

    def local(self, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
        if self.kind == "hash":
            return ids // self.servers
        starts = torch.tensor([self._start(num_rows, s) for s in range(self.servers)], dtype=ids.dtype)
        return ids - starts[self.owner(ids, num_rows)]


class PulledEmbeddings(nn.Module):
    """Looks up each table's ids in rows pulled for this batch (``set_rows``), not in whole tables, so
    ``DLRM`` runs unchanged on a worker and the math is the sync model's. The pulled row tensors are
    leaves with ``requires_grad``: after backward their ``.grad`` is the row-sparse gradient to push."""

    def __init__(self, specs: list[TableSpec]):
        super().__init__()
        self.specs = list(specs)
        self.mode = "mean" if specs and specs[0].pooling == "mean" else "sum"
        self.unique: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.specs]

    def set_rows(self, unique: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        """``unique[t]``: table t's sorted distinct ids in the batch; ``rows[t]``: their rows."""
        self.unique, self.rows = unique, rows

    def forward(self, sparse: JaggedBatch) -> torch.Tensor:
        check_ids(sparse, self.specs)
        vals, lens, wts = sparse.per_key()
        out = []
        for t in range(len(self.specs)):
            offsets = torch.cat([lens.new_zeros(1), torch.cumsum(lens[t], 0)[:-1]])
            local = torch.searchsorted(self.unique[t], vals[t])
            out.append(F.embedding_bag(local, self.rows[t], offsets, mode=self.mode,
                                       per_sample_weights=wts[t] if wts is not None else None))
        return torch.cat(out, dim=1)


def batch_ids(sparse: JaggedBatch, num_tables: int) -> list[torch.Tensor]:
    """Each table's sorted distinct ids in ``sparse``."""
    return [torch.unique(v) for v in torch.split(sparse.values, sparse.length_per_key())][:num_tables]
