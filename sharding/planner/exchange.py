"""What the output exchange costs per rank, flat or two-level (``sharding.two_level``): the pooled rows
(and, reversed, their gradients) a rank sends and receives within its node and between nodes.

    bytes_ = output_bytes(plan, topo, work, "two_level")   # per rank: Link(intra_out, intra_in, inter_out, inter_in)
    output_seconds(plan, topo, work, "flat")                # per rank: seconds of one direction
    two_level_delta(plan, topo, work)                       # what two-level adds per rank and direction

With b samples per rank, G ranks per node, N nodes, W = G N ranks, rank r of width w_r (the columns of
its shards) in node n, and W_n the columns of node n's pieces counted once (row shards of one table
and column range share theirs: their partial sums are added inside the node):

| exchange  | within the node (out / in)                   | between nodes (out / in)            |
|-----------|----------------------------------------------|-------------------------------------|
| flat      | (G-1) b w_r / b sum of the node's other w_d  | (W-G) b w_r / b sum of w_d off-node |
| two_level | N (G-1) b w_r / N b sum of the node's other  | (N-1) b W_n / b sum of W_m, m != n  |

A table_row_wise table of dim D on one node of G ranks sends (W-G) b D per rank between nodes flat,
(N-1) b D two-level: G times fewer. The flat exchange uses both links at once (the slower one
counts); the two-level one runs its two all-to-alls one after the other (their times add up) and
pays one more collective latency per direction. The ids go flat in both (``sharding.two_level``).
Bytes are the table's columns times the bytes of one value in that direction's precision
(``Workload.comm_bytes_forward`` for the pooled rows, ``comm_bytes_backward`` for their gradients).
``estimate_plan`` prices a two-level plan as the flat one plus ``two_level_delta``; the planner
(``planner.with_best_exchange``) keeps it where that lowers the step time.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from sharding.planner.types import Topology, Workload
from sharding.sharding_types import RULES
from sharding.types import ShardingPlan, ShardingType

# The default bytes per value on the wire: fp32, the runtime's pooled rows and gradients without
# plan.comm_precision (as estimate.FP32_BYTES; defined here because estimate imports this module).
FP32_BYTES = 4

# Two-level is taken only when it lowers the estimated step time by this fraction: smaller gains are
# below what the model tells apart (as partition.FINAL_PASS_MIN_GAIN), and flat has one collective less.
EXCHANGE_MARGIN = 1e-3


class Link(NamedTuple):
    """Bytes of one rank in one direction of the exchange."""

    intra_out: float
    intra_in: float
    inter_out: float
    inter_in: float


def rank_widths(plan: ShardingPlan) -> tuple[list[int], list[set[tuple[str, int, int]]]]:
    """(columns each rank pools for other ranks, per rank its pieces as (table, col_start, width))."""
    widths, pieces = [0] * plan.world_size, [set() for _ in range(plan.world_size)]
    for name, tp in plan.tables.items():
        if RULES[ShardingType(tp.sharding_type)].replicated:
            continue  # looked up where the samples are: nothing to send
        for s in tp.shards:
            widths[s.rank] += s.width
            pieces[s.rank].add((name, s.col_start, s.width))
    return widths, pieces


def output_bytes(plan: ShardingPlan, topo: Topology, work: Workload, exchange: str,
                 value_bytes: int = FP32_BYTES) -> list[Link]:
    """Per rank, the pooled-row bytes of the output exchange (the module's table, times ``value_bytes``,
    the bytes of one value in the direction's precision)."""
    g, nodes, world = topo.ranks_per_node, topo.nodes, topo.world_size
    widths, pieces = rank_widths(plan)
    row = work.batch_per_rank * value_bytes  # bytes of one column of one rank's samples
    node_w = [sum(w for _, _, w in set().union(*pieces[n * g:(n + 1) * g])) for n in range(nodes)]
    out = []
    for r in range(world):
        n = r // g
        mates = sum(widths[n * g:(n + 1) * g]) - widths[r]
        if exchange == "flat":
            out.append(Link((g - 1) * row * widths[r], row * mates,
                            (world - g) * row * widths[r], row * (sum(widths) - mates - widths[r])))
        else:
            out.append(Link(nodes * (g - 1) * row * widths[r], nodes * row * mates,
                            (nodes - 1) * row * node_w[n], row * (sum(node_w) - node_w[n])))
    return out


def output_seconds(plan: ShardingPlan, topo: Topology, work: Workload, exchange: str,
                   value_bytes: int = FP32_BYTES) -> list[float]:
    """Per rank, seconds of one direction of the output exchange (forward rows or backward gradients:
    the same columns reversed, ``value_bytes`` each), latency included."""
    eff = topo.comm_efficiency
    out = []
    for link in output_bytes(plan, topo, work, exchange, value_bytes):
        intra = max(link.intra_out, link.intra_in) / (topo.intra_node_bw_bytes_per_s * eff)
        inter = max(link.inter_out, link.inter_in) / (topo.inter_node_bw_bytes_per_s * eff)
        if exchange == "flat":
            out.append(max(intra, inter) + topo.collective_latency_s)
        else:
            out.append(intra + inter + 2 * topo.collective_latency_s)
    return out


def two_level_delta(plan: ShardingPlan, topo: Topology, work: Workload) -> list[tuple[float, float]]:
    """Per rank, what the two-level exchange adds (negative: saves) to the (forward, backward) seconds,
    each direction in its precision."""
    per_direction = []
    for value_bytes in (work.comm_bytes_forward, work.comm_bytes_backward):
        flat = output_seconds(plan, topo, work, "flat", value_bytes)
        per_direction.append([t - f for t, f in zip(output_seconds(plan, topo, work, "two_level", value_bytes), flat)])
    return list(zip(*per_direction))


def with_exchange(plan: ShardingPlan, topo: Topology, exchange: str) -> ShardingPlan:
    """``plan`` with ``exchange`` over ``topo``'s nodes: ``with_exchange(plan, topo, "two_level")``."""
    return dataclasses.replace(plan, exchange=exchange,
                               ranks_per_node=topo.ranks_per_node if exchange == "two_level" else None)
