"""What each sharding type is: how it cuts a table into shards, what a valid set of shards is, and what
it exchanges per step. The built-in placement, the validator, the planner's enumerator and its cost
model all ask here; the runtime needs none of it (every type is shards with row and column ranges).

    rule = RULES[ShardingType.COLUMN_WISE]
    rule.cut(TableConfig("C1", 1000, 10), 4)    # widths 3, 3, 2, 2: Shard(None, 0, 1000, 0, 3), ...
    rule.check(shards, table, world_size=4)     # PlanError naming the table unless they tile its columns
    rule.id_copies(4)                           # 4: each column shard looks up the whole bag

| type           | cut                  | placed                     | exchanges per step                  |
|----------------|----------------------|----------------------------|-------------------------------------|
| table_wise     | one whole shard      | any one rank               | ids to the owner, pooled rows back  |
| row_wise       | row blocks           | shard i on rank i          | ids to their rows' owner, partial   |
|                |                      |                            | pooled rows back, summed            |
| table_row_wise | row blocks           | the ranks of one node      | as row_wise; with the plan's        |
|                |                      |                            | two-level exchange the node's       |
|                |                      |                            | partials are summed before crossing |
| column_wise    | column blocks        | distinct ranks             | whole bags to every shard, pooled   |
|                |                      |                            | column slices back, concatenated    |
| data_parallel  | a whole copy per rank| every rank                 | none forward; gradients all-reduced |
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sharding.types import PlanError, Shard, ShardingType, TableConfig, rank_list

ROWS, COLUMNS, WHOLE = "rows", "columns", "whole"  # the axis a type cuts along
# Where the shards of a type may go: "any" distinct ranks (the placement chooses), "listed" (shard i on
# the i-th of the given ranks), "node" (listed, within one node), "every" rank (one copy each).
ANY, LISTED, NODE, EVERY = "any", "listed", "node", "every"


def row_cut(t: TableConfig, n: int) -> tuple[Shard, ...]:
    """Blocks of ceil(rows / n) rows, none empty: a table with fewer rows than ``n`` gets fewer shards."""
    return tuple(RowBlocks(t, n))


class RowBlocks(Sequence):
    """``row_cut(t, n)``'s shards, each made when read. The planner holds two row cuts per table (row-
    wise, table-row-wise) and reads two shards of most: 10,000 tables on 256 ranks would otherwise make
    5 million shards, seconds of the planning time.

        RowBlocks(TableConfig("C1", 1000, 8), 3)[2]     # Shard(None, 668, 1000, 0, 8)
    """

    __slots__ = ("rows", "dim", "block", "n")

    def __init__(self, t: TableConfig, n: int):
        self.rows, self.dim, self.block = t.num_rows, t.dim, -(-t.num_rows // n)
        self.n = -(-self.rows // self.block)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(self.n)))
        k = i + self.n if i < 0 else i
        if not 0 <= k < self.n:
            raise IndexError(i)
        start = k * self.block
        return Shard(None, start, min(start + self.block, self.rows), 0, self.dim)

    def __iter__(self):
        return map(self.__getitem__, range(self.n))

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, Sequence) else NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))


def column_cut(t: TableConfig, n: int) -> tuple[Shard, ...]:
    """``min(n, dim)`` column blocks whose widths differ by at most one, the wider first (even when
    ``n`` divides the dim)."""
    n = min(n, t.dim)
    base, extra = divmod(t.dim, n)
    shards, start = [], 0
    for i in range(n):
        width = base + (1 if i < extra else 0)
        shards.append(Shard(None, 0, t.num_rows, start, start + width))
        start += width
    return tuple(shards)


def whole(t: TableConfig) -> Shard:
    return Shard(None, 0, t.num_rows, 0, t.dim)


@dataclass(frozen=True)
class ShardingRule:
    """One sharding type: its cut, where its shards go, what it exchanges (see the module's table)."""

    kind: ShardingType
    axis: str  # ROWS, COLUMNS or WHOLE
    placement: str  # ANY, LISTED, NODE or EVERY

    @property
    def replicated(self) -> bool:
        """A full copy on every rank: looked up locally, no all-to-all; gradients all-reduced."""
        return self.placement == EVERY

    def cut(self, t: TableConfig, n: int = 1) -> tuple[Shard, ...]:
        """``t`` in ``n`` unplaced shards (whole-table types: one, or ``n`` copies if replicated)."""
        if self.axis == ROWS:
            return row_cut(t, n)
        if self.axis == COLUMNS:
            return column_cut(t, n)
        return (whole(t),) * (n if self.replicated else 1)

    def id_share(self, shard: Shard, t: TableConfig) -> float:
        """The share of a bag's ids this shard looks up: its rows' share when the rows are cut."""
        return shard.num_rows / t.num_rows if self.axis == ROWS else 1.0

    def id_copies(self, num_shards: int) -> int:
        """Copies of each id a rank sends: every column shard looks up the whole bag."""
        return num_shards if self.axis == COLUMNS else 1

    def samples(self, batch_per_rank: int, world_size: int) -> int:
        """Samples a shard pools per step: a replica its own rank's, any other shard every rank's."""
        return batch_per_rank if self.replicated else batch_per_rank * world_size

    def check(self, shards: list[Shard], t: TableConfig, world_size: int) -> None:
        """PlanError naming the table unless ``shards`` (each inside the table, on a valid rank) are a
        valid set of this type: one whole shard, a tiling of the rows or columns, a copy per rank."""
        if self.replicated:
            _check_replicas(shards, t, world_size)
        elif self.axis == WHOLE:
            if len(shards) != 1 or not is_whole(shards[0], t):
                raise PlanError(f"table-wise table {t.name} must have exactly one shard holding all its "
                                f"rows and columns, has {len(shards)} shard(s)")
        else:  # table-row-wise too: the node it sits on is the placement's business
            _check_tiling(shards, t, self.axis)


RULES = {rule.kind: rule for rule in (
    ShardingRule(ShardingType.TABLE_WISE, WHOLE, ANY),
    ShardingRule(ShardingType.ROW_WISE, ROWS, LISTED),
    ShardingRule(ShardingType.TABLE_ROW_WISE, ROWS, NODE),
    ShardingRule(ShardingType.COLUMN_WISE, COLUMNS, ANY),
    ShardingRule(ShardingType.DATA_PARALLEL, WHOLE, EVERY),
)}


def is_whole(s: Shard, t: TableConfig) -> bool:
    return (s.row_start, s.row_end, s.col_start, s.col_end) == (0, t.num_rows, 0, t.dim)


def _check_tiling(shards: list[Shard], t: TableConfig, axis: str) -> None:
    """Row (or column) shards must span the other axis and tile this one."""
    rows = axis == ROWS
    kind, unit, size = ("row-wise", "rows", t.num_rows) if rows else ("column-wise", "columns", t.dim)
    spans = [(s.row_start, s.row_end) if rows else (s.col_start, s.col_end) for s in shards]
    others = {(s.col_start, s.col_end) if rows else (s.row_start, s.row_end) for s in shards}
    if others != {(0, t.dim) if rows else (0, t.num_rows)}:
        raise PlanError(f"{kind} table {t.name} has a shard that does not hold all {'columns' if rows else 'rows'}")
    expected = 0
    for start, end in sorted(spans):
        if start < expected:
            raise PlanError(f"{kind} table {t.name} has overlapping shards at {unit} {start}..{expected}")
        if start > expected:
            raise PlanError(f"{kind} table {t.name} has no shard for {unit} [{expected}, {start})")
        expected = end
    if expected != size:
        raise PlanError(f"{kind} table {t.name} has no shard for {unit} [{expected}, {size})")


def _check_replicas(shards: list[Shard], t: TableConfig, world_size: int) -> None:
    if not all(is_whole(s, t) for s in shards):
        raise PlanError(f"data-parallel table {t.name} has a shard that is not the whole table")
    ranks = sorted(s.rank for s in shards)
    if ranks != list(range(world_size)):
        missing = sorted(set(range(world_size)) - set(ranks))
        detail = (f"no replica on rank(s) {rank_list(missing)}" if missing
                  else "more than one replica on a rank")
        raise PlanError(f"data-parallel table {t.name} needs one full replica on every rank: {detail}")

