"""One batch of a kernel benchmark (benchmarks/cpu_tbe.py, benchmarks/triton_tbe.py): the ids two ways (per
table for the TBEs, offset into one concatenated weight for the plain-PyTorch path) and the upstream gradient.

    Batch(indices, offsets, global_ids, grad, unique=int(torch.unique(global_ids).numel()))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    indices: torch.Tensor  # table-local ids, table-major
    offsets: torch.Tensor  # T * B + 1
    global_ids: torch.Tensor  # ids + the table's first row in one concatenated weight (torch path)
    grad: torch.Tensor  # upstream gradient [B, T * dim]
    unique: int  # distinct (table, row) pairs: the rows an update touches

    @property
    def n(self) -> int:
        return self.indices.numel()
