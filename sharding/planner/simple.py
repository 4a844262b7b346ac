"""The built-in placement: one sharding type per table, placed by table sizes alone.

    tables = [TableConfig("C1", 1000, 16), TableConfig("C2", 10, 16), TableConfig("C3", 50, 10)]
    plan = simple_plan(tables, world_size=4, default="table_wise", overrides={"C1": "row_wise"})
    plan.tables["C1"].shards[3]   # Shard(rank=3, row_start=750, row_end=1000, col_start=0, col_end=16)

It knows nothing about access frequencies or memory limits (that is ``plan_tables``, the cost-model
planner); it is deterministic, so every rank computes the same plan. The cuts are the ones every
sharding type has (``sharding.sharding_types``): row-wise over all ranks, column-wise in as many
column blocks as ranks (up to the dim), table-row-wise over one node's ranks, nodes taken in turn.
"""
from __future__ import annotations

from sharding.plan import check_tables, check_world_size, parse_sharding_type
from sharding.sharding_types import RULES
from sharding.types import PlanError, Shard, ShardingPlan, ShardingType, TableConfig, TablePlan

# Only a relative cost for balancing; the real element type is the runtime's business.
BYTES_PER_ELEMENT = 4


def simple_plan(tables: list[TableConfig], world_size: int, default: str | ShardingType,
                overrides: dict[str, str | ShardingType] | None = None,
                ranks_per_node: int | None = None) -> ShardingPlan:
    """One sharding type per table (``default`` unless overridden by name), placed deterministically.
    Table-row-wise tables take the nodes of ``ranks_per_node`` ranks in turn (one node: row-wise)."""
    check_tables(tables)
    check_world_size(world_size)
    types = _choose_types(tables, default, overrides or {})
    node = ranks_per_node or world_size
    if world_size % node:
        raise PlanError(f"{world_size} ranks do not split into nodes of {node} ranks")
    load = [0] * world_size
    plans: dict[str, TablePlan] = {}
    # Spread tables first: their shards are fixed, and the greedy table-wise pass must see their load.
    turns = {ShardingType.COLUMN_WISE: 0, ShardingType.TABLE_ROW_WISE: 0}  # rotation per type
    for t in tables:
        kind = types[t.name]
        if kind is ShardingType.TABLE_WISE:
            continue
        shards = _spread(t, kind, world_size, node, turns.get(kind, 0))
        turns[kind] = turns.get(kind, 0) + 1
        _add_load(load, shards)
        plans[t.name] = TablePlan(t.name, kind, shards)
    table_wise = [t for t in tables if types[t.name] is ShardingType.TABLE_WISE]
    # sorted() is stable, so equal-sized tables keep config order: the plan is deterministic.
    for t in sorted(table_wise, key=lambda t: t.num_rows * t.dim, reverse=True):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards = [s.on(rank) for s in RULES[ShardingType.TABLE_WISE].cut(t)]
        _add_load(load, shards)
        plans[t.name] = TablePlan(t.name, ShardingType.TABLE_WISE, shards)
    # Config order, so the plan (and its JSON) reads in the same order as the config.
    return ShardingPlan(world_size, {t.name: plans[t.name] for t in tables})


def _spread(t: TableConfig, kind: ShardingType, world_size: int, node: int, turn: int) -> list[Shard]:
    """The shards of a table that is not table-wise; ``turn`` counts earlier tables of its type."""
    rule = RULES[kind]
    if kind is ShardingType.TABLE_ROW_WISE:
        first = (turn % (world_size // node)) * node
        return [s.on(first + i) for i, s in enumerate(rule.cut(t, node))]
    shards = rule.cut(t, world_size)
    # Column-wise tables start one rank further each, so narrow tables do not all pile onto rank 0.
    offset = turn if kind is ShardingType.COLUMN_WISE else 0
    return [s.on((i + offset) % world_size) for i, s in enumerate(shards)]


def _choose_types(tables: list[TableConfig], default: str | ShardingType,
                  overrides: dict[str, str | ShardingType]) -> dict[str, ShardingType]:
    names = {t.name for t in tables}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise PlanError(f"sharding override names table(s) {', '.join(unknown)}, which are not "
                        f"configured; configured tables: {', '.join(t.name for t in tables)}")
    base = parse_sharding_type(default)
    return {t.name: parse_sharding_type(overrides[t.name], t.name) if t.name in overrides else base
            for t in tables}


def _add_load(load: list[int], shards: list[Shard]) -> None:
    for s in shards:
        load[s.rank] += s.num_rows * s.width * BYTES_PER_ELEMENT
