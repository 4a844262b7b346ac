"""What the DLRM asks of its embedding part: ``dims`` and a call on a JaggedBatch.

    pooled = model.embeddings(batch.sparse)        # [batch, sum of dims], features in table order

The trainer's ``sharding.runtime.ShardedEmbeddingCollection``, the PS worker's ``PulledEmbeddings`` and
the tests' single-process ``LocalEmbeddings`` all satisfy ``EmbeddingPart``.
"""
from __future__ import annotations

from typing import Protocol

import torch

from distrec.config import TableSpec
from sharding.jagged import JaggedBatch


class IdRangeError(ValueError):
    """An id outside its table, naming the feature and the table."""


class EmbeddingPart(Protocol):
    """Pools each feature's bag with its table; output columns follow the tables' order."""

    dims: list[int]

    def __call__(self, sparse: JaggedBatch) -> torch.Tensor: ...  # [B, sum(dims)]

    def parameters(self): ...


def check_ids(sparse: JaggedBatch, specs: list[TableSpec]) -> None:
    """Raise IdRangeError for an id < 0 or >= its table's rows (before torch's own opaque index error)."""
    bad = sparse.first_out_of_range([spec.num_rows for spec in specs])
    if bad is not None:
        spec, where = specs[bad[0]], f" in {sparse.origin}" if sparse.origin else ""
        raise IdRangeError(f"feature {spec.name}: id {bad[1]} is out of range for table {spec.name} "
                           f"with {spec.num_rows} rows{where}")
