"""Table initialisation that does not depend on the plan: any shard of a table gets the same values
as the same rows and columns of the whole table.

    w = init_rows(seed=0, table_index=3, num_rows=1000, dim=16, rows=(250, 500), cols=(0, 8))

Rows are made in fixed chunks, each from its own seeded generator, so a shard makes only the chunks it
overlaps (memory stays at one chunk, whatever the table size). ``init`` picks the values (``INITS``):
"uniform" (the default; DLRM's +-sqrt(1 / num_rows)), "normal" (mean 0, standard deviation ``std``) or
"zeros". Each chunk is drawn whole and then cut, so every init keeps the plan-independence above:

    w = init_rows(0, 3, 1000, 16, (250, 500), (0, 8), init="normal", std=0.01)
"""
from __future__ import annotations

import math

import torch

from sharding.types import TABLE_INITS

ROWS_PER_CHUNK = 4096
INITS = TABLE_INITS


def _chunk_seed(seed: int, table_index: int, chunk: int) -> int:
    return (seed * 1_000_003 + table_index) * 2_147_483_647 + chunk & 0x7FFF_FFFF_FFFF_FFFF


def _block(n: int, dim: int, init: str, std: float, num_rows: int, g: torch.Generator) -> torch.Tensor:
    """One chunk's rows, whole (all ``dim`` columns), so any cut of it is the same cut of the table."""
    if init == "uniform":
        bound = math.sqrt(1.0 / num_rows)
        return torch.empty(n, dim).uniform_(-bound, bound, generator=g)
    if init == "normal":
        return torch.empty(n, dim).normal_(0.0, std, generator=g)
    if init == "zeros":
        return torch.zeros(n, dim)
    raise ValueError(f"unknown table init {init!r}; expected one of {', '.join(INITS)}")


def init_rows(seed: int, table_index: int, num_rows: int, dim: int, rows: tuple[int, int],
              cols: tuple[int, int], init: str = "uniform", std: float = 0.0) -> torch.Tensor:
    start, end = rows
    parts = []
    for chunk in range(start // ROWS_PER_CHUNK, -(-end // ROWS_PER_CHUNK)):
        lo, hi = chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, num_rows)
        g = torch.Generator().manual_seed(_chunk_seed(seed, table_index, chunk))
        block = _block(hi - lo, dim, init, std, num_rows, g)
        parts.append(block[max(start, lo) - lo:min(end, hi) - lo, cols[0]:cols[1]])
    return torch.cat(parts) if parts else torch.empty(0, cols[1] - cols[0])
