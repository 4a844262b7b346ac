"""The cost model: bytes and seconds of one shard on its rank, summed per rank.

    cost = piece_cost(TableConfig("C1", 1000, 16), Shard(None, 0, 500, 0, 16), ShardingType.ROW_WISE, work, topo)
    cost.weights             # 500 rows x 16 columns x 4 bytes = 32000.0 (fp32; 2 bytes each in fp16 or bf16)
    ranks = estimate_plan(plan, tables, topo, work)      # [RankCost] for any ShardingPlan

What is counted is what ``sharding.runtime`` and ``sharding.optim`` do on a rank, per step:

- memory: weights in the table's storage precision (``TableConfig.precision``: 4 bytes fp32, 2 fp16
  or bf16); optimizer state, always fp32, per ``sharding.optim.state_names`` (adagrad: like the
  weights, rowwise_adagrad: one fp32 per row, adam: two like the weights and a scalar, sgd: none); the
  lookup's temporaries, fp32 (sparse gradient rows with int64 indices, copies of touched rows in the
  optimizer, which updates in fp32); the all-to-all buffers, fp32 (ids and lengths in, pooled rows
  out, their gradients in: kernels pool in fp32 and the half copies on the wire are transient; an
  all-reduce buffer of rows x (width + 1) fp32 for a replicated table); the reserve for the dense model.
- time: lookup forward (read each looked-up row in its storage precision, write each pooled bag in
  fp32) and backward (read the fp32 pooled gradient, write an fp32 sparse gradient row per id, read
  and write each touched row in storage precision and its fp32 state), at ``hbm_bw x
  lookup_efficiency``; each all-to-all takes max(bytes the rank sends, bytes it receives) x the share
  that leaves the rank, at the intra- or inter-node link rate, whichever is slower: ids and lengths as
  int64, pooled rows in ``Workload.comm_precision``, their gradients in ``comm_precision_backward``;
  replicated tables (fp32) and the dense model (``dense_comm_precision``) all-reduce their gradients
  (ring: 2 (W-1)/W of the bytes); the dense matmuls run at the fp32 rate, or with ``dense_precision``
  bf16 at ``Topology.dense_bf16_speedup`` times it. A plan with the two-level exchange pays the
  difference ``sharding.planner.exchange`` finds between its pooled-row bytes within and between
  nodes and the flat exchange's, in each direction (each in its direction's precision).

Ids are assumed spread evenly over a table's rows (``distrec data synth`` scatters popular ids over
the id space, and hashed ids are), so a row-wise shard of r rows out of R serves r/R of the ids.
Which ids a shard serves and what it exchanges is its type's (``sharding.sharding_types``).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from sharding.planner.exchange import two_level_delta
from sharding.planner.types import DenseCost, MemoryCost, RankCost, ShardOption, TimeCost, Topology, Workload
from sharding.sharding_types import ROWS, RULES
from sharding.types import BYTES_PER_ELEMENT, Shard, ShardingPlan, ShardingType, TableConfig, state_names

# What stays fp32 whatever the precisions (sharding.types.TableConfig.precision, sharding/optim.py,
# sharding/kernels): optimizer state, the kernels' pooled sums and the gradients of the weights (both
# computed in fp32), the optimizer's workspace, the replicas' gradient all-reduce, the dense weights.
FP32_BYTES = 4
ID_BYTES = 8  # ids and bag lengths travel as int64 (sharding/runtime.py, start_input_dist)
SPARSE_GRAD_INDEX_BYTES = 8  # int64 row index per id of a sparse COO gradient (embedding_bag sparse=True)
# Copies of each touched row the fused optimizer makes: coalesced gradient, gathered state, update
# (sharding/optim.py, _touched_rows and _adagrad): workspace only, they do not outlive the step.
TOUCHED_ROW_COPIES = 3
# Routing a rank's own ids: ~8 passes over int64 ids, each read and written (searchsorted, argsort,
# bincount, gathers in sharding/runtime.py _bucketize).
ROUTE_BYTES_PER_ID = 8 * 2 * ID_BYTES
# A replica's sparse gradient is coalesced (sorted by row) before the all-reduce: about two passes over
# (row, position) int64 pairs per id (assumption; the rate this runs at is Topology.replica_efficiency,
# which --calibrate measures on replicated tables).
COALESCE_BYTES_PER_ID = 2 * 16
# The replica all-reduce buffer [rows, width + 1] is zeroed, filled, reduced, scanned for touched rows
# and gathered from: five passes (sharding/runtime.py, sync_replica_grads).
REPLICA_BUFFER_PASSES = 5
# Collectives per step of the sharded runtime: forward counts, ids, pooled rows; backward gradients.
FWD_COLLECTIVES, BWD_COLLECTIVES = 3, 1
# fp32 tensors the dense optimizer reads and writes per parameter and step: weight, gradient, state.
DENSE_UPDATE_TENSORS = 2



class PieceCost(NamedTuple):
    """One shard on its rank per step, or (summed) a whole rank: bytes held, lookup seconds, the
    owner's side of the all-to-alls in bytes, all-reduce seconds. A tuple, so sums stay cheap."""

    weights: float = 0.0
    optimizer: float = 0.0
    workspace: float = 0.0
    buffers: float = 0.0
    lookup_fwd_s: float = 0.0
    lookup_bwd_s: float = 0.0
    ids_in: float = 0.0  # ids and lengths it receives
    pooled_out: float = 0.0  # pooled rows it sends back
    grads_in: float = 0.0  # pooled gradients it receives
    allreduce_s: float = 0.0

    @property
    def memory(self) -> float:
        return self.weights + self.optimizer + self.workspace + self.buffers


def stored_precision(t: TableConfig, kind: ShardingType | None = None) -> str:
    """How ``t``'s weights are stored placed as ``kind``: ``t.precision``, but a data-parallel replica in
    fp32 whatever it says (sharding.runtime keeps replicas in fp32)."""
    return "fp32" if kind is not None and RULES[kind].replicated else t.precision


def weight_bytes(t: TableConfig, kind: ShardingType | None = None) -> int:
    """Bytes of one stored weight of ``t``: 4 in fp32, 2 in fp16 or bf16 (``BYTES_PER_ELEMENT``)."""
    return BYTES_PER_ELEMENT[stored_precision(t, kind)]


def table_bytes(t: TableConfig, optimizer: str, kind: ShardingType | None = None) -> float:
    """Weights (as stored when placed as ``kind``) and optimizer state (fp32) of the whole table."""
    return t.num_rows * t.dim * weight_bytes(t, kind) + optimizer_bytes(optimizer, t.num_rows, t.dim)


def state_bytes_per_row(optimizer: str, width: int) -> int:
    """Bytes of optimizer state per row of a shard ``width`` columns wide (scalars left out)."""
    per_rule = {"row_col": width * FP32_BYTES, "row": FP32_BYTES, "scalar": 0}
    return sum(per_rule[rule] for rule in state_names(optimizer).values())


def optimizer_bytes(optimizer: str, rows: int, width: int) -> int:
    scalars = sum(1 for rule in state_names(optimizer).values() if rule == "scalar")
    return rows * state_bytes_per_row(optimizer, width) + scalars * FP32_BYTES


def ids_and_bags(t: TableConfig, p: Shard, kind: ShardingType, work: Workload, world: int) -> tuple[float, float]:
    """Ids a shard looks up per step and bags it pools: every sample of every rank, except a replica
    (its own rank's samples) and a row shard (its rows' share of the ids)."""
    rule = RULES[kind]
    batch = rule.samples(work.batch_per_rank, world)
    return batch * work.pooling_factor(t.name) * rule.id_share(p, t), float(batch)


def touched_rows(t: TableConfig, p: Shard, kind: ShardingType, work: Workload, world: int) -> float:
    """Rows the optimizer updates per step: at most one per id; a replica's all-reduced gradient holds
    the rows every rank touched."""
    ids, _ = ids_and_bags(t, p, kind, work, world)
    return min(ids * (world if RULES[kind].replicated else 1), p.num_rows)


def lookup_bytes(t: TableConfig, p: Shard, kind: ShardingType, work: Workload, world: int) -> tuple[float, float]:
    """(forward, backward) bytes a shard's lookup and fused update move per step."""
    ids, bags = ids_and_bags(t, p, kind, work, world)
    stored, pooled = p.width * weight_bytes(t, kind), p.width * FP32_BYTES  # a row as stored; an fp32 sum or gradient
    touched = touched_rows(t, p, kind, work, world)
    forward = ids * stored + bags * pooled
    backward = bags * pooled + ids * (pooled + SPARSE_GRAD_INDEX_BYTES) \
        + touched * 2 * (stored + state_bytes_per_row(work.optimizer, p.width))
    return forward, backward


def replica_sync_bytes(t: TableConfig, p: Shard, work: Workload) -> float:
    """What a replica's gradient sync moves besides the all-reduce: its ids sorted (coalesce) and its
    [rows, width + 1] buffer passed over (sharding/runtime.py, sync_replica_grads)."""
    return (work.batch_per_rank * work.pooling_factor(t.name) * COALESCE_BYTES_PER_ID
            + p.num_rows * (p.width + 1) * FP32_BYTES * REPLICA_BUFFER_PASSES)


def piece_cost(t: TableConfig, p: Shard, kind: ShardingType, work: Workload, topo: Topology) -> PieceCost:
    """What one shard costs its rank per step."""
    world = topo.world_size
    ids, bags = ids_and_bags(t, p, kind, work, world)
    row = p.width * FP32_BYTES  # fp32: pooled sums, gradient rows, the optimizer's copies
    touched = touched_rows(t, p, kind, work, world)
    forward, backward = lookup_bytes(t, p, kind, work, world)
    lookup_rate = topo.hbm_bw_bytes_per_s * topo.lookup_efficiency
    held = dict(weights=float(p.num_rows * p.width * weight_bytes(t, kind)),
                optimizer=float(optimizer_bytes(work.optimizer, p.num_rows, p.width)),
                workspace=ids * (row + SPARSE_GRAD_INDEX_BYTES) + touched * row * TOUCHED_ROW_COPIES,
                lookup_fwd_s=forward / lookup_rate)
    if RULES[kind].replicated:
        # sync_replica_grads: rows x (width + touched flag), fp32 like the replica itself.
        reduced = p.num_rows * (p.width + 1) * FP32_BYTES
        return PieceCost(**held, buffers=reduced + 2 * bags * row,
                         lookup_bwd_s=backward / lookup_rate + replica_sync_bytes(t, p, work) / topo.replica_bytes_per_s,
                         allreduce_s=allreduce_seconds(reduced, topo, latency=False))  # one per width: RankModel
    ids_in = (ids + bags) * ID_BYTES
    # Held in fp32 (pooled sums out, gradients in); on the wire in each direction's precision.
    return PieceCost(**held, buffers=ids_in + 2 * bags * row, lookup_bwd_s=backward / lookup_rate, ids_in=ids_in,
                     pooled_out=bags * p.width * work.comm_bytes_forward,
                     grads_in=bags * p.width * work.comm_bytes_backward)


def alltoall_seconds_per_byte(topo: Topology) -> float:
    """Seconds per byte a rank sends (or receives) in an all-to-all with every rank alike: 1/W of it
    stays on the rank, (G-1)/W goes over the node's links, (W-G)/W over the network; both at once."""
    w, g = topo.world_size, topo.ranks_per_node
    intra = (g - 1) / w / topo.intra_node_bw_bytes_per_s
    inter = (w - g) / w / topo.inter_node_bw_bytes_per_s
    return max(intra, inter) / topo.comm_efficiency


def allreduce_seconds(nbytes: float, topo: Topology, latency: bool = True) -> float:
    """Ring all-reduce: each rank sends and receives 2 (W-1)/W of the bytes over the slowest link."""
    w = topo.world_size
    if w == 1:
        return 0.0
    link = topo.inter_node_bw_bytes_per_s if topo.nodes > 1 else topo.intra_node_bw_bytes_per_s
    return 2 * (w - 1) / w * nbytes / (link * topo.comm_efficiency) + (topo.collective_latency_s if latency else 0)


def requester_bytes(t: TableConfig, option: ShardOption, work: Workload) -> tuple[float, float, float]:
    """What every rank sends and receives for its own samples of a table: (ids and lengths out, pooled
    rows in, pooled gradients out), on the wire: the other side of the owners' ``PieceCost`` bytes."""
    rule = RULES[option.kind]
    if rule.replicated:
        return 0.0, 0.0, 0.0
    b, pf, n = work.batch_per_rank, work.pooling_factor(t.name), len(option.shards)
    ids = b * (pf * rule.id_copies(n) + n) * ID_BYTES  # and one length per shard and sample
    widths = n * t.dim if rule.axis == ROWS else sum(p.width for p in option.shards)  # a row shard is whole-width
    return ids, b * widths * work.comm_bytes_forward, b * widths * work.comm_bytes_backward


def own_sample_buffers(requester: tuple[float, float, float], work: Workload) -> float:
    """Bytes every rank holds for its own samples from ``requester_bytes`` (summed over tables): ids and
    lengths out (twice: the routed copy), pooled rows in and their gradients out, in fp32 (the model
    takes the pooled rows in fp32 and its gradients are fp32: the half copies are transient)."""
    ids, pooled, grads = requester
    return 2 * ids + (pooled / work.comm_bytes_forward + grads / work.comm_bytes_backward) * FP32_BYTES


def dense_seconds(dense: DenseCost | None, work: Workload, topo: Topology) -> float:
    """MLP forward + backward (2x forward) FLOPs, the optimizer's pass over the (fp32) weights, DDP's
    all-reduce of the gradients in ``work.dense_comm_precision``."""
    if dense is None:
        return 0.0
    rate = topo.dense_flops_per_s * topo.dense_efficiency
    if work.dense_precision == "bf16":  # autocast: the matmuls in bf16, the weights and optimizer in fp32
        rate *= topo.dense_bf16_speedup
    compute = 3 * dense.flops_per_sample * work.batch_per_rank / rate
    update = dense.params * FP32_BYTES * 2 * (DENSE_UPDATE_TENSORS + dense.optimizer_state_per_param)
    update /= topo.hbm_bw_bytes_per_s * topo.lookup_efficiency
    return compute + update + allreduce_seconds(dense.params * work.dense_comm_bytes, topo)


class RankModel:
    """Turns per-rank sums of piece costs into a rank's time and memory, given what is the same on
    every rank (requester-side all-to-all bytes, routing, the dense model, reserve, fixed overheads)."""

    def __init__(self, topo: Topology, work: Workload, requester: tuple[float, float, float],
                 ids_per_rank: float, replica_widths: int, sharded: bool):
        self.topo, self.work, self.requester = topo, work, requester
        self.s_per_byte = alltoall_seconds_per_byte(topo)
        lookup_rate = topo.hbm_bw_bytes_per_s * topo.lookup_efficiency
        latency = topo.collective_latency_s if sharded and topo.world_size > 1 else 0.0
        self.fwd_latency, self.bwd_latency = FWD_COLLECTIVES * latency, BWD_COLLECTIVES * latency
        # One all-reduce per group of replicas of one width (sync_replica_grads): their latencies.
        self.replica_latency = replica_widths * topo.collective_latency_s if topo.world_size > 1 else 0.0
        self.dense = dense_seconds(work.dense, work, topo)
        self.other = ids_per_rank * ROUTE_BYTES_PER_ID / lookup_rate + topo.step_overhead_s
        self.uniform_buffers = own_sample_buffers(requester, work)

    def time(self, v: PieceCost) -> TimeCost:
        s, (ids, out, grad) = self.s_per_byte, self.requester
        return TimeCost(lookup_fwd=v.lookup_fwd_s, lookup_bwd=v.lookup_bwd_s,
                        comm_fwd=(max(v.ids_in, ids) + max(v.pooled_out, out)) * s + self.fwd_latency,
                        comm_bwd=max(v.grads_in, grad) * s + self.bwd_latency,
                        allreduce=v.allreduce_s + self.replica_latency, dense=self.dense, other=self.other)

    def times(self, base: np.ndarray, ids: np.ndarray, out: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """Total seconds of every rank from per-rank columns (arrays): lookup + all-reduce seconds
        (``base``) and the owner-side bytes of the three all-to-alls (the partitioner's inner loop)."""
        s, (ri, ro, rg) = self.s_per_byte, self.requester
        c = self.fwd_latency + self.bwd_latency + self.replica_latency + self.dense + self.other
        return base + (np.maximum(ids, ri) + np.maximum(out, ro) + np.maximum(grad, rg)) * s + c

    def memory(self, v: PieceCost) -> MemoryCost:
        return MemoryCost(weights=v.weights, optimizer=v.optimizer, workspace=v.workspace,
                          buffers=v.buffers + self.uniform_buffers, reserve=self.work.reserve_bytes)

    def free_bytes(self) -> float:
        """Memory of an empty rank left for shards."""
        return self.topo.hbm_bytes - self.uniform_buffers - self.work.reserve_bytes


def rank_model(chosen: list[tuple[TableConfig, ShardOption]], topo: Topology, work: Workload) -> RankModel:
    """The per-rank constants of a set of choices (one option per table)."""
    requester = [0.0, 0.0, 0.0]
    ids, widths, sharded = 0.0, set(), False
    for t, option in chosen:
        for i, x in enumerate(requester_bytes(t, option, work)):
            requester[i] += x
        if RULES[option.kind].replicated:
            widths.add(t.dim)
        else:
            ids += work.batch_per_rank * work.pooling_factor(t.name)
            sharded = True
    return RankModel(topo, work, tuple(requester), ids, len(widths), sharded)


def option_of(t: TableConfig, tp) -> tuple[ShardOption, list[int]]:
    """A TablePlan as an option and the rank of each of its shards."""
    ranks = [s.rank for s in tp.shards]
    return ShardOption(t.name, ShardingType(tp.sharding_type), tuple(tp.shards), tuple(ranks)), ranks


def estimate_plan(plan: ShardingPlan, tables: list[TableConfig], topo: Topology, work: Workload) -> list[RankCost]:
    """Per-rank memory and time of any plan (built by the planner, ``simple_plan`` or by hand)."""
    sums = np.zeros((topo.world_size, len(PieceCost._fields)))
    chosen = []
    for t in tables:
        option, ranks = option_of(t, plan.tables[t.name])
        chosen.append((t, option))
        by_shape: dict[tuple[int, int], list[int]] = {}  # row shards and replicas repeat one shape
        for shard, rank in zip(option.shards, ranks):
            by_shape.setdefault((shard.row_end - shard.row_start, shard.col_end - shard.col_start), []).append(rank)
        for (rows, width), on in by_shape.items():
            cost = piece_cost(t, Shard(None, 0, rows, 0, width), option.kind, work, topo)
            np.add.at(sums, on, np.array(cost))  # unbuffered: a rank holding two shards adds both
    model = rank_model(chosen, topo, work)
    times = [model.time(PieceCost(*map(float, v))) for v in sums]
    if plan.exchange == "two_level":  # the pooled rows and their gradients go within the node first
        times = [dataclasses.replace(t, comm_fwd=t.comm_fwd + fwd, comm_bwd=t.comm_bwd + bwd)
                 for t, (fwd, bwd) in zip(times, two_level_delta(plan, topo, work))]
    return [RankCost(r, model.memory(PieceCost(*map(float, v))), t) for r, (v, t) in enumerate(zip(sums, times))]
