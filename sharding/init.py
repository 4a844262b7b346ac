"""Table initialisation that does not depend on the plan: any shard of a table gets the same values
as the same rows and columns of the whole table.

    w = init_rows(seed=0, table_index=3, num_rows=1000, dim=16, rows=(250, 500), cols=(0, 8))

Rows are made in fixed chunks, each from its own seeded generator, so a shard makes only the chunks it
overlaps (memory stays at one chunk, whatever the table size). Values follow DLRM: uniform in
+-sqrt(1 / num_rows).
"""
from __future__ import annotations

import math

import torch

ROWS_PER_CHUNK = 4096


def _chunk_seed(seed: int, table_index: int, chunk: int) -> int:
    return (seed * 1_000_003 + table_index) * 2_147_483_647 + chunk & 0x7FFF_FFFF_FFFF_FFFF


def init_rows(seed: int, table_index: int, num_rows: int, dim: int, rows: tuple[int, int],
              cols: tuple[int, int]) -> torch.Tensor:
    bound = math.sqrt(1.0 / num_rows)
    start, end = rows
    parts = []
    for chunk in range(start // ROWS_PER_CHUNK, -(-end // ROWS_PER_CHUNK)):
        lo, hi = chunk * ROWS_PER_CHUNK, min((chunk + 1) * ROWS_PER_CHUNK, num_rows)
        g = torch.Generator().manual_seed(_chunk_seed(seed, table_index, chunk))
        block = torch.empty(hi - lo, dim).uniform_(-bound, bound, generator=g)
        parts.append(block[max(start, lo) - lo:min(end, hi) - lo, cols[0]:cols[1]])
    return torch.cat(parts) if parts else torch.empty(0, cols[1] - cols[0])
