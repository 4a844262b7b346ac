"""The cost-model planner's orchestrator: table specs + a topology + a batch size -> the ShardingPlan the
runtime executes, with its estimated per-rank memory and step time and the reason for every table.

    result = plan_tables(tables, make_topology("h100-80g", 8), Workload(batch_per_rank=8192))
    result.plan, result.step_s, result.decisions["C1"].reason

enumerate_options (per table) -> Search (estimate every shard, choose and place) -> the exchange
(flat, or two-level when the inter-node link is the bottleneck) -> validate_plan ->
estimate_plan (the same model, from the plan itself) -> explain. When nothing fits, the message names
the tables, the memory missing per rank and the smallest topology change that would fit.
"""
from __future__ import annotations

import contextlib
import gc
import math
import time

from sharding.plan import check_tables, validate_plan
from sharding.planner.enumerators import enumerate_options
from sharding.planner.estimate import estimate_plan, own_sample_buffers, requester_bytes, table_bytes
from sharding.planner.exchange import EXCHANGE_MARGIN, with_exchange
from sharding.planner.partition import Search
from sharding.planner.report import explain, infeasible_message
from sharding.planner.types import GB, InfeasiblePlanError, PlannerError, PlanResult, TableConstraints, Topology, Workload
from sharding.sharding_types import RULES
from sharding.types import OPTIMIZERS, PRECISIONS, ShardingPlan, TableConfig, TablePlan

# Tables up to this size (fp32 weights, whatever their storage: a replica's gradient all-reduce is fp32) may be replicated when the config does not say otherwise:
# a replica costs memory on every rank and an all-reduce of the whole table per step.
DEFAULT_DP_MAX_BYTES = 64e6
MAX_SUGGESTION_TRIES = 12  # plans tried while looking for the smallest topology that fits



def plan_tables(tables: list[TableConfig], topology: Topology, workload: Workload,
                constraints: dict[str, TableConstraints] | None = None,
                dp_max_bytes: float = DEFAULT_DP_MAX_BYTES, suggest: bool = True) -> PlanResult:
    """Plan ``tables`` on ``topology``; InfeasiblePlanError (tables, missing GB per rank, the smallest
    topology change that fits, unless ``suggest`` is False) when no plan fits."""
    with _no_cycle_collection():
        return _plan_tables(tables, topology, workload, constraints or {}, dp_max_bytes, suggest)


@contextlib.contextmanager
def _no_cycle_collection():
    """Python's cycle collector off while planning: the search makes millions of small objects (shards
    of 10,000 tables on 256 ranks) and no cycles, and each collection would walk all of them again
    (it doubled the planning time of that case). Refcounting still frees everything."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _plan_tables(tables: list[TableConfig], topology: Topology, workload: Workload,
                 constraints: dict[str, TableConstraints], dp_max_bytes: float, suggest: bool) -> PlanResult:
    start = time.perf_counter()
    _check_inputs(tables, workload, constraints)
    options = [enumerate_options(t, topology, constraints.get(t.name, TableConstraints()), dp_max_bytes)
               for t in tables]
    search = Search(tables, options, topology, workload)
    search.run()
    if search.too_big or search.unplaced or search.overfull():
        raise _infeasible(search, constraints, dp_max_bytes, suggest)
    plan = with_best_exchange(_to_plan(search), tables, topology, workload)
    validate_plan(plan, tables, topology.world_size)
    ranks = estimate_plan(plan, tables, topology, workload)  # the same model, from the plan itself
    decisions = explain(search, constraints)
    return PlanResult(plan, topology, workload, ranks, decisions, time.perf_counter() - start)


def _check_inputs(tables: list[TableConfig], work: Workload, constraints: dict[str, TableConstraints]) -> None:
    check_tables(tables)
    if work.optimizer not in OPTIMIZERS:
        raise PlannerError(f"unknown sparse optimizer {work.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if work.batch_per_rank < 1:
        raise PlannerError(f"batch size per rank must be >= 1, got {work.batch_per_rank}")
    names = {t.name for t in tables}
    unknown = sorted((set(constraints) | set(work.pooling)) - names)
    if unknown:
        raise PlannerError(f"planner settings name table(s) {', '.join(unknown)}, which are not configured")
    bad = sorted(name for name, pf in work.pooling.items() if not pf > 0)
    if bad:
        raise PlannerError(f"pooling factor of table(s) {', '.join(bad)} must be > 0")
    _check_precisions(tables, work)


def _check_precisions(tables: list[TableConfig], work: Workload) -> None:
    named = [(f"table {t.name}", t.precision) for t in tables] + [
        (f"workload {k}", getattr(work, k)) for k in ("comm_precision", "comm_precision_backward",
                                                      "dense_comm_precision", "dense_precision")]
    bad = [(what, p) for what, p in named if p not in PRECISIONS]
    if bad:
        raise PlannerError(f"{bad[0][0]}: precision {bad[0][1]!r} is not one of {', '.join(PRECISIONS)}")


def _to_plan(search: Search) -> ShardingPlan:
    plans = {}
    for ti, t in enumerate(search.tables):
        option = search.options[ti][search.choice[ti]]
        shards = [s.on(r) for s, r in zip(option.shards, search.ranks[ti])]
        plans[t.name] = TablePlan(t.name, option.kind, sorted(shards, key=lambda s: (s.col_start, s.row_start)))
    return ShardingPlan(search.topo.world_size, plans)


def with_best_exchange(plan: ShardingPlan, tables: list[TableConfig], topo: Topology,
                       work: Workload) -> ShardingPlan:
    """``plan`` with the two-level exchange where that lowers the estimated step time by EXCHANGE_MARGIN
    (so only with more than one node), else with the flat one. Chosen after placement: the search
    prices the flat exchange (``sharding.planner.exchange`` says what either costs)."""
    flat = with_exchange(plan, topo, "flat")
    if topo.nodes == 1:
        return flat
    two = with_exchange(plan, topo, "two_level")
    step = [max(r.time.total for r in estimate_plan(p, tables, topo, work)) for p in (flat, two)]
    return two if step[1] < step[0] * (1 - EXCHANGE_MARGIN) else flat


# ---- when nothing fits ---------------------------------------------------------------------------

def _table_bytes(t: TableConfig, work: Workload) -> float:
    return table_bytes(t, work.optimizer)


def _infeasible(search: Search, constraints, dp_max_bytes: float, suggest: bool) -> InfeasiblePlanError:
    topo, work, tables = search.topo, search.work, search.tables
    need = _need_per_rank(search)
    missing = max(need - topo.hbm_bytes, 0.0)
    failed = sorted(search.too_big | set(search.unplaced))
    if missing > 0:
        failed = _largest_until(search, missing * topo.world_size) or failed
    elif not failed:
        failed = _tables_on(search, search.overfull())
    worst_rank = None
    if missing <= 0:  # fragmentation or pinning: what the failed tables lack where they may go
        worst_rank, missing = _shortfall(search, failed)
    suggestion = _suggest(search, constraints, dp_max_bytes, need) if suggest else ""
    message = infeasible_message(search, [tables[ti] for ti in failed], need, missing, suggestion, worst_rank)
    return InfeasiblePlanError(message, [tables[ti].name for ti in failed], missing, suggestion)


def _need_per_rank(search: Search) -> float:
    """Memory per rank if every table took its least-memory option spread perfectly over the ranks."""
    total = sum(min(sum(h.mem for h in costs) for costs in per) for per in search.costs)
    return total / search.topo.world_size + search.topo.hbm_bytes - search.model.free_bytes()


def _largest_until(search: Search, deficit: float) -> list[int]:
    """The largest tables whose memory together covers ``deficit``: without them the rest would fit."""
    order = sorted(range(len(search.tables)), key=lambda ti: -_table_bytes(search.tables[ti], search.work))
    out, freed = [], 0.0
    for ti in order:
        if freed >= deficit:
            break
        out.append(ti)
        freed += _table_bytes(search.tables[ti], search.work)
    return sorted(out)


def _tables_on(search: Search, ranks: list[int]) -> list[int]:
    return sorted({ti for ti, held in enumerate(search.ranks) if held and set(held) & set(ranks)})


def _shortfall(search: Search, failed: list[int]) -> tuple[int, float]:
    """(rank, bytes it lacks) if the failed tables took their smallest-shard options on the least
    loaded of the ranks they may use, every other table staying where it is."""
    extra = [0.0] * search.topo.world_size
    for ti in failed:
        oi = min(range(len(search.options[ti])), key=lambda oi: search.max_piece_mem(ti, oi))
        option, used = search.options[ti][oi], []
        for h in search.costs[ti][oi]:
            free = [r for r in option.ranks if r not in used] or list(option.ranks)
            r = min(free, key=lambda r: extra[r] - search.free_bytes(r))
            used.append(r)
            extra[r] += h.mem
    rank = max(range(len(extra)), key=lambda r: extra[r] - search.free_bytes(r))
    return rank, max(extra[rank] - search.free_bytes(rank), 0.0)


def _suggest(search: Search, constraints, dp_max_bytes: float, need: float) -> str:
    tables, topo, work = search.tables, search.topo, search.work
    ranks = None if _floor_per_rank(search) > topo.hbm_bytes - work.reserve_bytes else \
        _smallest_world(tables, topo, work, constraints, dp_max_bytes)
    gb = _smallest_memory(tables, topo, work, constraints, dp_max_bytes, need)
    parts = []
    if ranks:
        parts.append(f"{ranks} ranks" + (f" ({ranks // topo.ranks_per_node} nodes)" if topo.nodes > 1 else "")
                     + f" (--gpus {ranks})")
    if gb:
        parts.append(f"{gb} GB per rank (--hbm-gb {gb})")
    if not parts:
        return "none found within 64x the ranks or memory"
    return " or ".join(parts) + ("" if ranks else " (more ranks do not help)")


def _floor_per_rank(search: Search) -> float:
    """Bytes every rank holds however many ranks there are: per table, the least of its options'
    all-to-all buffers (the same on every rank: its own samples' ids, pooled rows and gradients) or,
    replicated, its whole shard. When this alone does not fit, more ranks do not help."""
    floor = 0.0
    for ti, (t, options) in enumerate(zip(search.tables, search.options)):
        floor += min(search.max_piece_mem(ti, oi) if RULES[option.kind].replicated
                     else own_sample_buffers(requester_bytes(t, option, search.work), search.work)
                     for oi, option in enumerate(options))
    return floor


def _fits(tables, topo: Topology, work: Workload, constraints, dp_max_bytes: float) -> bool:
    """Whether the search places every table on ``topo`` (its placement stages only: a suggestion
    tries up to 2 x MAX_SUGGESTION_TRIES topologies)."""
    try:
        options = [enumerate_options(t, topo, constraints.get(t.name, TableConstraints()), dp_max_bytes)
                   for t in tables]
    except PlannerError:
        return False
    return Search(tables, options, topo, work).place()


def _smallest_world(tables, topo: Topology, work: Workload, constraints, dp_max_bytes: float) -> int | None:
    """The fewest ranks (whole nodes when there are several) that fit, per-rank batch unchanged."""
    step = topo.ranks_per_node if topo.nodes > 1 else 1
    total = sum(_table_bytes(t, work) for t in tables)
    lower = math.ceil(total / max(topo.hbm_bytes - work.reserve_bytes, 1.0) / step) * step
    world = max(topo.world_size + step, lower)
    for _ in range(MAX_SUGGESTION_TRIES):
        if world > 64 * topo.world_size:
            break
        if _fits(tables, topo.with_(world_size=world, nodes=world // topo.ranks_per_node if topo.nodes > 1 else 1),
                 work, constraints, dp_max_bytes):
            return world
        world += max(step, world // 8 // step * step)
    return None


def _smallest_memory(tables, topo: Topology, work: Workload, constraints, dp_max_bytes: float,
                     need: float) -> int | None:
    """The least whole GB per rank that fits on these ranks."""
    gb = max(math.ceil(need / GB), math.floor(topo.hbm_bytes / GB) + 1)
    for _ in range(MAX_SUGGESTION_TRIES):
        if gb * GB > 64 * topo.hbm_bytes:
            break
        if _fits(tables, topo.with_(hbm_bytes=gb * GB), work, constraints, dp_max_bytes):
            return gb
        gb = max(gb + 1, math.ceil(gb * 1.1))
    return None
