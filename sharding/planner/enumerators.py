"""Candidate shardings per table: the first stage of the planner.

    options = enumerate_options(TableConfig("C1", 10**7, 128), topo, TableConstraints(), dp_max_bytes=64e6)
    [o.label for o in options]     # ['table_wise', 'row_wise x8', 'column_wise x2', ..., 'column_wise x8']

Each type cuts the table as ``sharding.sharding_types`` says; which cuts are worth pricing is this
stage's choice: data-parallel only for small tables (replicas cost memory on every rank and an
all-reduce of the whole table per step), column-wise only in even cuts at least MIN_COLUMN_WIDTH wide,
table-row-wise only when there is more than one node. Per-table constraints narrow the types and ranks.
"""
from __future__ import annotations

from sharding.planner.estimate import FP32_BYTES
from sharding.planner.types import PlannerError, ShardOption, TableConstraints, Topology
from sharding.sharding_types import RULES, RowBlocks
from sharding.types import ShardingType, TableConfig

# Narrowest column shard: 8 fp32 = 32 bytes, one memory transaction sector on NVIDIA GPUs (CUDA C++
# Programming Guide, "Device Memory Accesses"); narrower shards only multiply the ids sent around.
# TorchRec's planner uses 128 (MIN_CW_DIM, torchrec/distributed/planner/constants.py) for its kernels.
# Only even cuts: every shard of an option then has one cost, and dims are mostly powers of two, whose
# even cuts already come in steps of 2x (``simple_plan`` may cut unevenly; the cut rule is the same).
MIN_COLUMN_WIDTH = 8

TW, RW, CW, DP, TWRW = (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE,
                        ShardingType.DATA_PARALLEL, ShardingType.TABLE_ROW_WISE)


def enumerate_options(t: TableConfig, topo: Topology, constraints: TableConstraints,
                      dp_max_bytes: float) -> list[ShardOption]:
    """Every sharding of ``t`` the constraints allow, table-wise first; PlannerError names the table
    when none is left."""
    ranks = _candidate_ranks(t, topo, constraints)
    allowed = set(constraints.allowed) if constraints.allowed is not None else None
    # fp32 bytes whatever the storage: what the limit bounds is a replica's all-reduce, fp32 (estimate)
    small = t.num_rows * t.dim * FP32_BYTES <= dp_max_bytes

    def ok(kind: ShardingType) -> bool:
        return kind in allowed if allowed is not None else (kind is not DP or small)

    options: list[ShardOption] = []
    if ok(TW):
        options.append(ShardOption(t.name, TW, RULES[TW].cut(t), ranks))
    if ok(RW) and len(ranks) > 1 and t.num_rows > 1:
        options.append(_row_option(t, RW, ranks))
    if ok(CW):
        options += [_column_option(t, n, ranks) for n in column_counts(t.dim, len(ranks))]
    if ok(TWRW) and topo.nodes > 1 and topo.ranks_per_node > 1 and constraints.ranks is None:
        options.append(_row_option(t, TWRW, tuple(topo.node_ranks(0))))
    if ok(DP) and constraints.ranks is None:
        options.append(ShardOption(t.name, DP, RULES[DP].cut(t, topo.world_size), tuple(range(topo.world_size))))
    if not options:
        raise PlannerError(_nothing_allowed(t, topo, constraints))
    return options


def column_counts(dim: int, max_shards: int) -> list[int]:
    """Column-shard counts n >= 2 that divide ``dim`` into shards at least MIN_COLUMN_WIDTH wide."""
    return [n for n in range(2, min(dim, max_shards) + 1) if dim % n == 0 and dim // n >= MIN_COLUMN_WIDTH]


def _candidate_ranks(t: TableConfig, topo: Topology, constraints: TableConstraints) -> tuple[int, ...]:
    if constraints.ranks is None:
        return tuple(range(topo.world_size))
    bad = [r for r in constraints.ranks if not 0 <= r < topo.world_size]
    if bad or not constraints.ranks:
        raise PlannerError(f"table {t.name} is pinned to ranks {list(constraints.ranks)}, but the topology "
                           f"has ranks 0..{topo.world_size - 1}")
    return tuple(sorted(set(constraints.ranks)))


def _row_option(t: TableConfig, kind: ShardingType, ranks: tuple[int, ...]) -> ShardOption:
    shards = RowBlocks(t, len(ranks))  # RULES[kind].cut(t, len(ranks)) (RW, TWRW: rows), read when needed
    return ShardOption(t.name, kind, shards, ranks[:len(shards)])


def _column_option(t: TableConfig, n: int, ranks: tuple[int, ...]) -> ShardOption:
    return ShardOption(t.name, CW, RULES[CW].cut(t, n), ranks)


def _nothing_allowed(t: TableConfig, topo: Topology, c: TableConstraints) -> str:
    allowed = ", ".join(k.value for k in c.allowed) if c.allowed is not None else "any"
    why = []
    if c.allowed is not None and CW in c.allowed:
        why.append(f"column_wise needs a column count >= 2 dividing dim {t.dim} into shards >= "
                   f"{MIN_COLUMN_WIDTH} wide")
    if c.allowed is not None and DP in c.allowed and c.ranks is not None:
        why.append("data_parallel puts a replica on every rank, so it cannot be pinned")
    if c.allowed is not None and TWRW in c.allowed and topo.nodes == 1:
        why.append("table_row_wise needs more than one node")
    if c.allowed is not None and RW in c.allowed:
        why.append("row_wise needs >= 2 rows and >= 2 ranks")
    return (f"table {t.name} ({t.num_rows} rows, dim {t.dim}): no sharding is possible with allowed types "
            f"[{allowed}]" + (f" on ranks {list(c.ranks)}" if c.ranks is not None else "")
            + ("; " + "; ".join(why) if why else ""))
