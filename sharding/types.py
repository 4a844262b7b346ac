"""The sparse operation kit's vocabulary: tables, shards, plans.

    tables = [TableConfig("C1", num_rows=1000, dim=16), TableConfig("C2", 50, 16, pooling="mean")]
    plan = ShardingPlan(world_size=2, tables={"C1": TablePlan("C1", ShardingType.ROW_WISE, [
        Shard(rank=0, row_start=0, row_end=500, col_start=0, col_end=16),
        Shard(rank=1, row_start=500, row_end=1000, col_start=0, col_end=16)]), ...})

Every table has a plan; a table-wise table has one shard (all rows and columns), a row-wise table one
shard per row range, a column-wise table one shard per column range, and a data-parallel table one
full shard on every rank (a replica; its gradients are all-reduced). A table-row-wise table is row-wise
with its shards on the ranks of one node only (the planner's choice when nodes > 1); the runtime routes
it like any row-wise table. The plan also says how pooled rows go back (``exchange``: flat, or
two-level within nodes of ``ranks_per_node`` ranks first). ``sharding.sharding_types`` says how each type cuts a table and what it
exchanges; the names below are the kit's vocabulary, which configs and command lines check against.
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


SHARDING_TYPES = tuple(t.value for t in ShardingType)
KERNELS = ("auto", "torch", "fbgemm", "triton", "cpu")  # lookup kernels (sharding.lookup picks "auto")
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")  # fused sparse optimizers (sharding.optim)
# How a table's weights are stored (optimizer state is always fp32) and how pooled vectors travel:
# sharding.rounding says how an update is rounded to a half-precision weight.
PRECISIONS = ("fp32", "fp16", "bf16")
BYTES_PER_ELEMENT = {"fp32": 4, "fp16": 2, "bf16": 2}


class PlanError(ValueError):
    """A plan that does not fit the tables or the ranks; the message names the table."""


TABLE_INITS = ("uniform", "normal", "zeros")  # sharding.init.init_rows: a table's initial values


@dataclass(frozen=True)
class TableConfig:
    name: str  # also the feature (key) that is looked up in it
    num_rows: int
    dim: int
    pooling: str = "sum"  # sum | mean
    init: str = "uniform"  # TABLE_INITS: uniform (+-sqrt(1 / num_rows)) | normal | zeros
    init_std: float = 0.0  # the standard deviation of init = "normal"
    precision: str = "fp32"  # PRECISIONS: how the weights are stored (optimizer state is fp32)


# Dynamic (hash-keyed) tables, sharding.dynamic: what a full shard does with a newly admitted id, and what
# ``evict(step)`` removes. "none": nothing is evicted, a new id finds no room and is rejected (counted);
# "lru": the least recently seen slot makes room; "lfu": the least often seen one; "steps_to_live": slots
# not seen for more than ``steps_to_live`` steps are freed by ``evict(step)``; "l2": slots whose row norm
# is below ``l2_threshold`` are freed by ``evict(step)`` (the last two reject like "none" when full).
DYNAMIC_EVICTIONS = ("none", "lru", "lfu", "steps_to_live", "l2")
DYNAMIC_INITS = ("uniform", "normal", "zeros")  # a new row: +-init_bound, or mean 0 and std init_std


@dataclass(frozen=True)
class DynamicTableConfig:
    """A table keyed by raw int64 ids (any value), rows made on admission: ``capacity`` rows per rank.

        DynamicTableConfig("user", dim=16, capacity=100_000, admit_count=2, evict="lru")
    """

    name: str  # also the feature (key) looked up in it
    dim: int
    capacity: int  # rows per rank
    pooling: str = "sum"  # sum | mean (mean divides by the bag's length, ids not admitted included)
    admit_count: int = 1  # occurrences before an id gets a row; 1: at first sight
    evict: str = "none"  # DYNAMIC_EVICTIONS
    steps_to_live: int = 0  # evict == "steps_to_live": steps a slot may go unseen
    l2_threshold: float = 0.0  # evict == "l2": a row norm below this is evicted
    init: str = "uniform"  # DYNAMIC_INITS
    init_bound: float = 0.01  # init == "uniform": values in [-init_bound, init_bound)
    init_std: float = 0.01  # init == "normal"

    def __post_init__(self):
        bad = _dynamic_problem(self)
        if bad:
            raise ValueError(f"dynamic table {self.name}: {bad}")


def _dynamic_problem(t: DynamicTableConfig) -> str | None:
    checks = [(t.dim >= 1, f"dim {t.dim} must be >= 1"),
              (t.capacity >= 1, f"capacity {t.capacity} must be >= 1 (rows per rank)"),
              (t.pooling in ("sum", "mean"), f"pooling {t.pooling!r} must be sum or mean"),
              (t.admit_count >= 1, f"admit_count {t.admit_count} must be >= 1"),
              (t.evict in DYNAMIC_EVICTIONS, f"evict {t.evict!r} must be one of {', '.join(DYNAMIC_EVICTIONS)}"),
              (t.evict != "steps_to_live" or t.steps_to_live >= 1, f"steps_to_live {t.steps_to_live} must be >= 1"),
              (t.evict != "l2" or t.l2_threshold > 0, f"l2_threshold {t.l2_threshold} must be > 0"),
              (t.init in DYNAMIC_INITS, f"init {t.init!r} must be one of {', '.join(DYNAMIC_INITS)}"),
              (t.init_bound >= 0 and t.init_std >= 0, "init_bound and init_std must be >= 0")]
    return next((why for ok, why in checks if not ok), None)


@dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_end) and columns [col_start, col_end) of a table, held by ``rank``; a cut
    not yet placed (the planner's candidates) has ``rank`` None: ``Shard(None, 0, 500, 0, 16).on(3)``."""

    rank: int | None
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

    def on(self, rank: int) -> "Shard":
        # not dataclasses.replace: the planner places millions of shards, and replace() is ~4x slower
        return Shard(rank, self.row_start, self.row_end, self.col_start, self.col_end)


@dataclass
class TablePlan:
    table: str
    sharding_type: ShardingType
    shards: list[Shard] = field(default_factory=list)


# How pooled rows travel back to the samples' ranks (sharding.two_level): "flat", one all-to-all over
# all ranks; "two_level", summed inside each node of ``ranks_per_node`` consecutive ranks first, then
# one exchange between nodes per peer rank (the planner's choice when the inter-node link is the
# bottleneck). Both give the same results; only the bytes that cross nodes differ.
EXCHANGES = ("flat", "two_level")


@dataclass
class ShardingPlan:
    world_size: int
    tables: dict[str, TablePlan]  # by table name
    exchange: str = "flat"  # one of EXCHANGES
    ranks_per_node: int | None = None  # the node size "two_level" groups ranks by (None with "flat")


def rank_list(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": short even for data-parallel tables on many ranks."""
    parts, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(parts) or "-"


def state_names(kind: str) -> dict[str, str]:
    """Per-param state tensors of ``kind`` and how each one lines up with the weight.

    "row_col": same shape as the weight [rows, width]; "row": [rows]; "scalar": one
    value for the whole shard (never sliced when resharding by rows).
    """
    check_optimizer(kind)
    if kind == "adagrad":
        return {"sum": "row_col"}
    if kind == "rowwise_adagrad":
        return {"row_sum": "row"}
    if kind == "adam":
        return {"step": "scalar", "exp_avg": "row_col", "exp_avg_sq": "row_col"}
    return {}


def check_optimizer(kind: str) -> None:
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer kind {kind!r}; expected one of {OPTIMIZERS}")
