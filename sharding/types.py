"""The sparse operation kit's vocabulary: tables, shards, plans.

    tables = [TableConfig("C1", num_rows=1000, dim=16), TableConfig("C2", 50, 16, pooling="mean")]
    plan = ShardingPlan(world_size=2, tables={"C1": TablePlan("C1", ShardingType.ROW_WISE, [
        Shard(rank=0, row_start=0, row_end=500, col_start=0, col_end=16),
        Shard(rank=1, row_start=500, row_end=1000, col_start=0, col_end=16)]), ...})

Every table has a plan; a table-wise table has one shard (all rows and columns), a row-wise table one
shard per row range, a column-wise table one shard per column range, and a data-parallel table one
full shard on every rank (a replica; its gradients are all-reduced). A table-row-wise table is row-wise
with its shards on the ranks of one node only (the planner's choice when nodes > 1); the runtime routes
it like any row-wise table.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ShardingType(str, enum.Enum):
    TABLE_WISE = "table_wise"
    ROW_WISE = "row_wise"
    COLUMN_WISE = "column_wise"
    DATA_PARALLEL = "data_parallel"
    TABLE_ROW_WISE = "table_row_wise"


class PlanError(ValueError):
    """A plan that does not fit the tables or the ranks; the message names the table."""


@dataclass(frozen=True)
class TableConfig:
    name: str  # also the feature (key) that is looked up in it
    num_rows: int
    dim: int
    pooling: str = "sum"  # sum | mean


@dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_end) and columns [col_start, col_end) of a table, held by ``rank``."""

    rank: int
    row_start: int
    row_end: int
    col_start: int
    col_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def width(self) -> int:
        return self.col_end - self.col_start


@dataclass
class TablePlan:
    table: str
    sharding_type: ShardingType
    shards: list[Shard] = field(default_factory=list)


@dataclass
class ShardingPlan:
    world_size: int
    tables: dict[str, TablePlan]  # by table name
