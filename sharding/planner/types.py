"""The planner's vocabulary: the machine (Topology), the work beside the tables (Workload), per-table
constraints, candidate shardings (ShardOption), their estimated costs, and the result.

    topo = make_topology("h100-80g", world_size=8, hbm_bytes=16 * GB)     # sharding.planner.topology
    work = Workload(batch_per_rank=8192, optimizer="adagrad", pooling={"C1": 1.0})
    result = plan_tables(tables, topo, work)     # -> PlanResult; result.plan is a ShardingPlan

Units: bytes, seconds and bytes per second inside; the report prints GB (1e9 bytes) and ms.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from sharding.types import BYTES_PER_ELEMENT, PlanError, Shard, ShardingPlan, ShardingType

GB = 1e9  # bytes; GPU memory is quoted in these units by the vendors' datasheets


def human_bytes(nbytes: float) -> str:
    """``human_bytes(23.5e9)`` -> "23.50 GB": decimal units, as GPU datasheets quote memory."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


class PlannerError(PlanError):
    """The planner was asked something it cannot do (bad topology, contradictory constraints)."""


class InfeasiblePlanError(PlannerError):
    """No plan fits: ``tables`` do not fit, ranks miss ``missing_bytes_per_rank`` of memory, and
    ``suggestion`` is the smallest topology change that would fit. The message says all three."""

    def __init__(self, message: str, tables: list[str], missing_bytes_per_rank: float, suggestion: str):
        super().__init__(message)
        self.tables, self.missing_bytes_per_rank, self.suggestion = tables, missing_bytes_per_rank, suggestion


@dataclass(frozen=True)
class Topology:
    """Ranks, how they are grouped into nodes, and each rank's device (see ``sharding.planner.topology``
    for the presets and where every number comes from)."""

    world_size: int
    nodes: int
    hbm_bytes: float  # device memory per rank
    hbm_bw_bytes_per_s: float  # device memory bandwidth per rank
    intra_node_bw_bytes_per_s: float  # per rank, one direction (NVLink on GPUs)
    inter_node_bw_bytes_per_s: float  # per rank, one direction (the rank's share of its node's NICs)
    dense_flops_per_s: float  # fp32 matrix multiply peak per rank
    lookup_efficiency: float  # fraction of hbm_bw an embedding lookup + update achieves
    comm_efficiency: float  # fraction of link bandwidth an all-to-all / all-reduce achieves
    dense_efficiency: float  # fraction of dense_flops_per_s the MLPs achieve
    collective_latency_s: float  # fixed cost of one collective call
    step_overhead_s: float  # fixed cost per step and rank outside the terms above (launches, Python)
    replica_efficiency: float = 0.0  # like lookup_efficiency, for replicas' gradient sync; 0: the same
    # The dense part's rate under bf16 autocast over its fp32 rate: 1.0 (no gain assumed) unless
    # calibrated (``distrec plan --calibrate`` times the dense step in bf16 where the CPU has bf16 units).
    dense_bf16_speedup: float = 1.0
    name: str = "custom"
    calibrated: str = ""  # where measured rates came from, if any

    def __post_init__(self):
        if self.world_size < 1 or self.nodes < 1:
            raise PlannerError(f"topology needs >= 1 rank and >= 1 node, got {self.world_size} and {self.nodes}")
        if self.world_size % self.nodes:
            raise PlannerError(f"{self.world_size} ranks do not split evenly over {self.nodes} nodes")
        for name in ("hbm_bytes", "hbm_bw_bytes_per_s", "intra_node_bw_bytes_per_s",
                     "inter_node_bw_bytes_per_s", "dense_flops_per_s", "lookup_efficiency",
                     "comm_efficiency", "dense_efficiency", "dense_bf16_speedup"):
            if not getattr(self, name) > 0:
                raise PlannerError(f"topology {self.name}: {name} must be > 0, got {getattr(self, name)}")

    @property
    def replica_bytes_per_s(self) -> float:
        return self.hbm_bw_bytes_per_s * (self.replica_efficiency or self.lookup_efficiency)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    def with_(self, **changes) -> "Topology":
        return replace(self, **changes)


@dataclass(frozen=True)
class DenseCost:
    """The dense part of one training step, per sample: the model's matmul FLOPs (forward only) and
    its parameter count (for the optimizer and the gradient all-reduce)."""

    flops_per_sample: float
    params: int
    optimizer_state_per_param: int = 2  # fp32 tensors per parameter (Adam: 2, Adagrad: 1, SGD: 0)


@dataclass(frozen=True)
class Workload:
    """What runs beside the tables: the per-rank batch, the sparse optimizer (``sharding.optim`` kinds),
    mean ids per sample per table (default 1.0), the memory kept back for the dense model, and the
    precisions (``sharding.types.PRECISIONS``) of the exchanges and the dense part."""

    batch_per_rank: int
    optimizer: str = "adagrad"
    pooling: dict[str, float] = field(default_factory=dict)
    reserve_bytes: float = 1 * GB
    dense: DenseCost | None = None
    comm_precision: str = "fp32"  # the pooled rows of the output all-to-all (forward)
    comm_precision_backward: str = "fp32"  # their gradients (backward)
    dense_comm_precision: str = "fp32"  # the dense gradients' all-reduce: fp32 | bf16
    dense_precision: str = "fp32"  # the dense matmuls (train.precision): fp32 | bf16

    def pooling_factor(self, table: str) -> float:
        return self.pooling.get(table, 1.0)

    @property
    def comm_bytes_forward(self) -> int:
        """Bytes of one pooled value on the wire, forward (4 in fp32, 2 in fp16 or bf16)."""
        return BYTES_PER_ELEMENT[self.comm_precision]

    @property
    def comm_bytes_backward(self) -> int:
        """Bytes of one pooled gradient value on the wire, backward."""
        return BYTES_PER_ELEMENT[self.comm_precision_backward]

    @property
    def dense_comm_bytes(self) -> int:
        """Bytes of one dense gradient in the all-reduce."""
        return BYTES_PER_ELEMENT[self.dense_comm_precision]


@dataclass(frozen=True)
class TableConstraints:
    """Per table: the sharding types it may take (None: any) and the ranks its shards may use (None: any)."""

    allowed: tuple[ShardingType, ...] | None = None
    ranks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MemoryCost:
    """Bytes on one rank."""

    weights: float = 0.0
    optimizer: float = 0.0
    workspace: float = 0.0  # the lookup kernel's temporaries: sparse gradient, touched-row copies
    buffers: float = 0.0  # all-to-all and all-reduce buffers at the batch size
    reserve: float = 0.0  # dense model and activations (configured)

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.workspace + self.buffers + self.reserve

    @property
    def tables(self) -> float:
        """Shards plus optimizer state: what the runtime allocates for as long as it runs."""
        return self.weights + self.optimizer

    def __add__(self, other: "MemoryCost") -> "MemoryCost":
        return MemoryCost(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self) -> tuple[float, ...]:
        return self.weights, self.optimizer, self.workspace, self.buffers, self.reserve


@dataclass(frozen=True)
class TimeCost:
    """Seconds per step on one rank."""

    lookup_fwd: float = 0.0
    lookup_bwd: float = 0.0  # backward and the fused optimizer update
    comm_fwd: float = 0.0  # id and pooled-output all-to-alls
    comm_bwd: float = 0.0  # pooled-gradient all-to-all
    allreduce: float = 0.0  # replicated tables' gradients
    dense: float = 0.0  # MLPs forward and backward, their optimizer and all-reduce
    other: float = 0.0  # routing ids, fixed per-step overhead

    @property
    def lookup(self) -> float:
        return self.lookup_fwd + self.lookup_bwd

    @property
    def comm(self) -> float:
        return self.comm_fwd + self.comm_bwd + self.allreduce

    @property
    def total(self) -> float:
        return self.lookup + self.comm + self.dense + self.other


@dataclass(frozen=True)
class ShardOption:
    """A candidate sharding of one table: its cut (shards without ranks yet) and ``ranks``, the ranks it
    may use, in order; where on them its shards may go is its type's placement (``sharding_types``)."""

    table: str
    kind: ShardingType
    shards: tuple[Shard, ...]
    ranks: tuple[int, ...]

    @property
    def label(self) -> str:
        n = len(self.shards)
        return self.kind.value if n == 1 or self.kind is ShardingType.DATA_PARALLEL else f"{self.kind.value} x{n}"


@dataclass(frozen=True)
class TableDecision:
    """Why a table got its option: ``reason`` (the binding constraint) and the best rejected
    alternative with what it would have cost (``alternative_cost``: words, e.g. "+1.2 ms step")."""

    table: str
    option: ShardOption
    reason: str
    alternative: str = ""
    alternative_cost: str = ""


@dataclass(frozen=True)
class RankCost:
    rank: int
    memory: MemoryCost
    time: TimeCost


@dataclass
class PlanResult:
    """The plan and its estimates: per rank costs, per table decisions, the slowest rank's step time."""

    plan: ShardingPlan
    topology: Topology
    workload: Workload
    ranks: list[RankCost]
    decisions: dict[str, TableDecision]
    planning_s: float = 0.0

    @property
    def step_s(self) -> float:
        return max(r.time.total for r in self.ranks)

    @property
    def mean_step_s(self) -> float:
        return sum(r.time.total for r in self.ranks) / len(self.ranks)

    @property
    def imbalance(self) -> float:
        """Slowest rank over the mean, minus one: 0.05 means the slowest rank is 5 % above the mean."""
        return self.step_s / self.mean_step_s - 1.0 if self.mean_step_s else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.workload.batch_per_rank * self.topology.world_size / self.step_s
