"""What the planner prints: a row per table (with why), a row per rank, the totals; the message when
nothing fits; what-if comparisons side by side.

    print(format_result(result, tables))
    print(format_what_if([("gpus=4", result4), ("gpus=8", result8)]))
"""
from __future__ import annotations

from sharding.types import rank_list
from sharding.planner.estimate import estimate_plan, stored_precision, table_bytes
from sharding.planner.exchange import with_exchange
from sharding.planner.types import GB, PlannerError, PlanResult, TableDecision, Workload, human_bytes
from sharding.types import ShardingType, TableConfig


size = human_bytes


# ---- why ----------------------------------------------------------------------------------------

def explain(search, constraints: dict | None = None) -> dict[str, TableDecision]:
    """Each table's reason (the config's constraints first) and its best rejected alternative: the
    option that would have given the lowest step time in its place, every other table where it is
    (``Search.alternatives``)."""
    worst = max(search.times())
    out = {}
    for ti, t in enumerate(search.tables):
        option = search.options[ti][search.choice[ti]]
        alt, cost = _best_alternative(search, ti, worst)
        reason = search.reason[ti] or "cost: least total work"
        c = (constraints or {}).get(t.name)
        if c is not None and (c.allowed is not None or c.ranks is not None):
            reason = f"{_constraint_text(c)}; {reason}"
        out[t.name] = TableDecision(t.name, option, reason, alt, cost)
    return out


def _constraint_text(c) -> str:
    parts = []
    if c.allowed is not None:
        parts.append("only " + "/".join(k.value for k in c.allowed))
    if c.ranks is not None:
        parts.append("ranks " + rank_list(sorted(set(c.ranks))))
    return "config: " + ", ".join(parts)


def _best_alternative(search, ti: int, worst: float) -> tuple[str, str]:
    alts = search.alternatives[ti]
    fits = [(after, oi) for oi, after in alts if after is not None]
    if fits:
        after, oi = min(fits)
        return search.options[ti][oi].label, f"step {(after - worst) * 1e3:+.2f} ms"
    if alts:
        oi = min((oi for oi, _ in alts), key=lambda oi: search.max_piece_mem(ti, oi))
        return search.options[ti][oi].label, f"does not fit ({size(search.max_piece_mem(ti, oi))} on one rank)"
    return "", "no other option allowed"


# ---- the printed plan ---------------------------------------------------------------------------

def _columns(rows: list[tuple[str, ...]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_tables(result: PlanResult, tables: list[TableConfig]) -> str:
    rows = [("table", "rows", "dim", "ids/sample", "size", "stored", "type", "ranks", "why", "best rejected alternative")]
    for t in tables:
        d, kind = result.decisions[t.name], ShardingType(result.plan.tables[t.name].sharding_type)
        ranks = sorted({s.rank for s in result.plan.tables[t.name].shards})
        alt = f"{d.alternative}: {d.alternative_cost}" if d.alternative else d.alternative_cost
        rows.append((t.name, f"{t.num_rows:,}", str(t.dim), f"{result.workload.pooling_factor(t.name):g}",
                     size(table_bytes(t, result.workload.optimizer, kind)), stored_precision(t, kind),
                     d.option.label, rank_list(ranks), d.reason, alt))
    return _columns(rows, right={1, 2, 3, 4})


def format_ranks(result: PlanResult) -> str:
    rows = [("rank", "memory used / available", "lookup ms", "comm ms", "dense+other ms", "total ms")]
    cap = result.topology.hbm_bytes
    for r in result.ranks:
        rows.append((str(r.rank), f"{r.memory.total / GB:.2f} / {cap / GB:.2f} GB", f"{r.time.lookup * 1e3:.2f}",
                     f"{r.time.comm * 1e3:.2f}", f"{(r.time.dense + r.time.other) * 1e3:.2f}",
                     f"{r.time.total * 1e3:.2f}"))
    return _columns(rows, right={1, 2, 3, 4, 5})


def format_exchange(result: PlanResult, tables: list[TableConfig]) -> str:
    """The plan's output exchange and what the other one would cost."""
    plan, topo = result.plan, result.topology
    if topo.nodes == 1:
        return "exchange: flat (one node)"
    other = "flat" if plan.exchange == "two_level" else "two_level"
    alt = estimate_plan(with_exchange(plan, topo, other), tables, topo, result.workload)
    cost = f"{other}: step {(max(r.time.total for r in alt) - result.step_s) * 1e3:+.2f} ms"
    how = (f"pooled rows summed within nodes of {plan.ranks_per_node} ranks, then between nodes"
           if plan.exchange == "two_level" else "one all-to-all over all ranks")
    return f"exchange: {plan.exchange} ({how}; {cost})"


def format_summary(result: PlanResult, tables: list[TableConfig]) -> str:
    topo, work = result.topology, result.workload
    counts: dict[str, int] = {}
    for tp in result.plan.tables.values():
        kind = ShardingType(tp.sharding_type).value
        counts[kind] = counts.get(kind, 0) + 1
    slowest = max(result.ranks, key=lambda r: r.time.total)
    return "\n".join([
        "tables: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        f"imbalance: slowest rank {slowest.rank} is {result.imbalance * 100:.1f} % above the mean "
        f"({result.step_s * 1e3:.2f} vs {result.mean_step_s * 1e3:.2f} ms)",
        format_exchange(result, tables),
        f"largest rank memory: {max(r.memory.total for r in result.ranks) / GB:.2f} of {topo.hbm_bytes / GB:.2f} GB",
        f"estimated step time: {result.step_s * 1e3:.2f} ms -> {result.samples_per_s:,.0f} samples/s "
        f"({work.batch_per_rank:,} per rank x {topo.world_size} ranks)",
        f"planned in {result.planning_s:.2f} s",
    ])


def format_header(result: PlanResult) -> str:
    topo, work = result.topology, result.workload
    calibrated = f", calibrated from {topo.calibrated}" if topo.calibrated else ""
    return (f"plan: {topo.world_size} ranks on {topo.nodes} node(s), {topo.name} ({size(topo.hbm_bytes)}, "
            f"{topo.hbm_bw_bytes_per_s / GB:,.0f} GB/s memory, {topo.intra_node_bw_bytes_per_s / GB:,.1f} GB/s "
            f"intra-node, {topo.inter_node_bw_bytes_per_s / GB:,.2f} GB/s inter-node per rank{calibrated}); "
            f"batch {work.batch_per_rank:,} per rank; sparse optimizer {work.optimizer}; "
            f"reserve {size(work.reserve_bytes)} per rank; {format_precisions(work)}")


def format_precisions(work: Workload) -> str:
    """The exchanges' and the dense part's precisions (the tables' storage is in their rows)."""
    return (f"pooled all-to-all {work.comm_precision} forward, {work.comm_precision_backward} backward; "
            f"dense all-reduce {work.dense_comm_precision}, dense matmuls {work.dense_precision}")


def format_result(result: PlanResult, tables: list[TableConfig]) -> str:
    return "\n\n".join([format_header(result), format_tables(result, tables), format_ranks(result),
                        format_summary(result, tables)])


# ---- infeasible ---------------------------------------------------------------------------------

def infeasible_message(search, failed: list[TableConfig], need: float, missing: float, suggestion: str,
                       worst_rank: int | None = None) -> str:
    topo, work = search.topo, search.work
    listed = ", ".join(f"{t.name} ({t.num_rows:,} rows x {t.dim}, {size(table_bytes(t, work.optimizer))} "
                       f"with {work.optimizer} state)" for t in failed[:8])
    more = f" and {len(failed) - 8} more" if len(failed) > 8 else ""
    text = (f"no plan fits {topo.world_size} ranks with {topo.hbm_bytes / GB:.1f} GB each: tables "
            f"{listed}{more} do not fit; ")
    if need > topo.hbm_bytes:
        text += (f"even spread evenly the tables need {need / GB:.2f} GB per rank, "
                 f"{missing / GB:.2f} GB more than each rank has")
    else:
        text += (f"where the config and the other tables leave room for them, rank {worst_rank} lacks "
                 f"{missing / GB:.2f} GB")
    if suggestion:
        text += f"; smallest change that fits: {suggestion}"
    return text


# ---- what-if ------------------------------------------------------------------------------------

def format_what_if(scenarios: list[tuple[str, PlanResult | PlannerError]]) -> str:
    """Scenarios side by side, one column each."""
    header = ("", *[name for name, _ in scenarios])
    lines = [("ranks x memory",), ("batch per rank",), ("tables tw/rw/cw/dp/twrw",), ("step ms",),
             ("samples/s",), ("imbalance",), ("largest rank memory",), ("fits",)]
    rows = [list(line) for line in lines]
    for _, res in scenarios:
        for row, cell in zip(rows, _what_if_cells(res)):
            row.append(cell)
    return _columns([header, *[tuple(r) for r in rows]], right=set(range(1, len(header))))


def _what_if_cells(res) -> list[str]:
    if isinstance(res, PlannerError):
        missing = getattr(res, "missing_bytes_per_rank", 0.0)
        return ["-", "-", "-", "-", "-", "-", "-", f"no: {missing / GB:.2f} GB/rank short" if missing else "no"]
    kinds = [ShardingType(tp.sharding_type) for tp in res.plan.tables.values()]
    order = (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE, ShardingType.DATA_PARALLEL,
             ShardingType.TABLE_ROW_WISE)
    return [f"{res.topology.world_size} x {res.topology.hbm_bytes / GB:.0f} GB", f"{res.workload.batch_per_rank:,}",
            "/".join(str(kinds.count(k)) for k in order), f"{res.step_s * 1e3:.2f}", f"{res.samples_per_s:,.0f}",
            f"{res.imbalance * 100:.1f} %", f"{max(r.memory.total for r in res.ranks) / GB:.2f} GB", "yes"]
