"""Planner at scale: random tables planned for many ranks, distrec's planner beside TorchRec's
``EmbeddingShardingPlanner`` on the same tables and topology.

    .venv/bin/python benchmarks/planner_scale.py                       # 2,000 tables, 64 ranks
    .venv/bin/python benchmarks/planner_scale.py --tables 200 --ranks 16 --torchrec-timeout 120

Tables: rows log-uniform in [1e2, 1e8], dims from {16, 32, 64, 128, 256}, one id per sample, seeded.
Topology: H200 (141 GB, 4.8 TB/s), 8 ranks per node, batch 8192 per rank, row-wise Adagrad state.
TorchRec gets the same device numbers (hbm_cap, hbm_mem_bw, intra/inter-host bandwidth), the same batch,
``EXACT_ROWWISE_ADAGRAD`` fused params, and a storage reservation equal to our 1 GB reserve; it plans
on the meta device with ``compute_device="cuda"`` (no GPU needed). Reported per planner: wall seconds
(and CPU seconds of the planning process, which other jobs on a shared machine disturb less),
its own estimate of the slowest rank and of the largest rank's memory, and, to compare the plans on
one yardstick, distrec's cost model applied to both plans (TorchRec's plan converted shard by shard).
TorchRec's estimate models fbgemm's GPU kernels and its own communication; ours models distrec's runtime,
so ours judging TorchRec's plan is not neutral: read it as "what that plan would cost in distrec".
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import time
import traceback
from collections import Counter

from sharding.planner import GB, PlannerError, Workload, estimate_plan, make_topology, plan_tables
from sharding.types import Shard, ShardingPlan, ShardingType, TableConfig, TablePlan

BATCH_PER_RANK = 8192
RANKS_PER_NODE = 8
OPTIMIZER = "rowwise_adagrad"
PRESET = "h200"
DIMS = (16, 32, 64, 128, 256)


def random_tables(n: int, seed: int) -> list[TableConfig]:
    rng = random.Random(seed)
    return [TableConfig(f"t{i}", int(10 ** rng.uniform(2, 8)), rng.choice(DIMS)) for i in range(n)]


def topology(ranks: int):
    return make_topology(PRESET, ranks, nodes=max(ranks // RANKS_PER_NODE, 1))


def ours(tables: list[TableConfig], ranks: int) -> dict:
    topo, work = topology(ranks), Workload(BATCH_PER_RANK, OPTIMIZER)
    start, cpu = time.perf_counter(), time.process_time()
    result = plan_tables(tables, topo, work)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "own_step_ms": result.step_s * 1e3,
            "own_max_memory_gb": max(r.memory.total for r in result.ranks) / GB,
            "model_step_ms": result.step_s * 1e3, "model_max_memory_gb": max(r.memory.total for r in result.ranks) / GB,
            "imbalance": result.imbalance, "types": _types(result.plan)}


def _types(plan: ShardingPlan) -> str:
    counts = Counter(ShardingType(tp.sharding_type).value for tp in plan.tables.values())
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


# ---- TorchRec ---------------------------------------------------------------------------------------

def torchrec_plan(tables: list[TableConfig], ranks: int, out: dict, budget_s: int | None) -> None:
    """Runs in a child process (so a timeout can stop it); fills ``out``."""
    try:
        import torch
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingBagCollection
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.stats import NoopEmbeddingStats
        from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
        from torchrec.modules.embedding_configs import EmbeddingBagConfig

        topo = topology(ranks)
        per_ms = 1e-3  # TorchRec's bandwidths are bytes per millisecond
        trec_topo = Topology(world_size=ranks, compute_device="cuda", hbm_cap=int(topo.hbm_bytes),
                             local_world_size=topo.ranks_per_node, hbm_mem_bw=topo.hbm_bw_bytes_per_s * per_ms,
                             intra_host_bw=topo.intra_node_bw_bytes_per_s * per_ms,
                             inter_host_bw=topo.inter_node_bw_bytes_per_s * per_ms)
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows,
                                                                feature_names=[t.name]) for t in tables],
                                     device=torch.device("meta"))
        planner = EmbeddingShardingPlanner(topology=trec_topo, batch_size=BATCH_PER_RANK, debug=False,
                                           stats=[NoopEmbeddingStats()], timeout_seconds=budget_s,
                                           storage_reservation=HeuristicalStorageReservation(percentage=1 * GB / topo.hbm_bytes))
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD})
        start, cpu = time.perf_counter(), time.process_time()
        plan = planner.plan(ebc, [sharder])
        out["seconds"], out["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        perf, hbm = [0.0] * ranks, [0.0] * ranks
        for option in planner._best_plan:
            for shard in option.shards:
                perf[shard.rank] += shard.perf.total
                hbm[shard.rank] += shard.storage.hbm
        out["own_step_ms"], out["own_max_memory_gb"] = max(perf), max(hbm) / GB
        out["plan"] = _convert(plan.plan[""], tables, ranks)
    except Exception:  # reported in the table, not raised: the point is the side-by-side
        out["error"] = traceback.format_exc(limit=3)


def _convert(module_plan, tables: list[TableConfig], ranks: int) -> dict:
    """TorchRec's ParameterShardings as (type, [(rank, row_start, row_end, col_start, col_end)])."""
    out = {}
    for t in tables:
        ps = module_plan[t.name]
        if ps.sharding_type == "data_parallel":
            out[t.name] = ("data_parallel", [(r, 0, t.num_rows, 0, t.dim) for r in range(ranks)])
            continue
        shards = []
        for md in ps.sharding_spec.shards:
            (r0, c0), (nr, nc) = md.shard_offsets, md.shard_sizes
            shards.append((md.placement.rank(), r0, r0 + nr, c0, c0 + nc))
        out[t.name] = (ps.sharding_type, shards)
    return out


def torchrec(tables: list[TableConfig], ranks: int, timeout_s: float, budget_s: int | None = None) -> dict:
    """TorchRec's planner in a child process, killed after ``timeout_s``; ``budget_s`` is its own
    ``timeout_seconds`` (it stops proposing then and keeps the best plan found so far)."""
    with mp.Manager() as manager:
        out = manager.dict()
        proc = mp.get_context("fork").Process(target=torchrec_plan, args=(tables, ranks, out, budget_s))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.terminate()
            proc.join()
            return {"error": f"did not finish within {timeout_s:.0f} s"}
        result = dict(out)
    if "plan" in result:
        result.update(_model_costs(tables, ranks, result.pop("plan")))
    return result


def _model_costs(tables: list[TableConfig], ranks: int, converted: dict) -> dict:
    """distrec's cost model on TorchRec's plan (types distrec's runtime does not have are noted)."""
    kinds = {k.value: k for k in ShardingType}
    unknown = sorted({kind for kind, _ in converted.values() if kind not in kinds})
    if unknown:
        return {"model_note": f"TorchRec chose {', '.join(unknown)}, which distrec's runtime does not run"}
    plan = ShardingPlan(ranks, {name: TablePlan(name, kinds[kind], [Shard(*s) for s in shards])
                                for name, (kind, shards) in converted.items()})
    costs = estimate_plan(plan, tables, topology(ranks), Workload(BATCH_PER_RANK, OPTIMIZER))
    return {"model_step_ms": max(r.time.total for r in costs) * 1e3,
            "model_max_memory_gb": max(r.memory.total for r in costs) / GB, "types": _types(plan)}


def table(rows: list[tuple[str, dict]]) -> str:
    def cell(d, key, fmt):
        return fmt.format(d[key]) if key in d else "-"

    lines = ["| planner | planning s (CPU s) | own estimate: slowest rank ms | own estimate: largest rank GB | "
             "distrec model: slowest rank ms | distrec model: largest rank GB | types |", "|---|---|---|---|---|---|---|"]
    for name, d in rows:
        cpu = f" ({d['cpu_seconds']:.2f})" if "cpu_seconds" in d else ""
        lines.append(f"| {name} | {cell(d, 'seconds', '{:.2f}')}{cpu} | {cell(d, 'own_step_ms', '{:.2f}')} | "
                     f"{cell(d, 'own_max_memory_gb', '{:.1f}')} | {cell(d, 'model_step_ms', '{:.2f}')} | "
                     f"{cell(d, 'model_max_memory_gb', '{:.1f}')} | {d.get('types', d.get('error', '')).strip()} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torchrec-timeout", type=float, default=1800.0, help="seconds; 0 skips TorchRec")
    p.add_argument("--torchrec-budget", type=int, default=0,
                   help="also run TorchRec with timeout_seconds=this (its best plan so far)")
    p.add_argument("--budget-only", action="store_true", help="run TorchRec only with --torchrec-budget")
    args = p.parse_args()
    tables = random_tables(args.tables, args.seed)
    print(f"{args.tables} tables ({sum(t.num_rows for t in tables):,} rows), {args.ranks} ranks of {PRESET}, "
          f"batch {BATCH_PER_RANK} per rank, {OPTIMIZER}", flush=True)
    try:
        mine = ours(tables, args.ranks)
    except PlannerError as e:
        mine = {"error": str(e)}
    print(f"distrec: {mine}", flush=True)
    rows = [("distrec `plan_tables`", mine)]
    if args.torchrec_timeout and not args.budget_only:
        theirs = torchrec(tables, args.ranks, args.torchrec_timeout)
        print(f"torchrec: {theirs}", flush=True)
        rows.append(("TorchRec `EmbeddingShardingPlanner`", theirs))
    if args.torchrec_budget:
        budgeted = torchrec(tables, args.ranks, args.torchrec_timeout, args.torchrec_budget)
        print(f"torchrec, timeout_seconds={args.torchrec_budget}: {budgeted}", flush=True)
        rows.append((f"TorchRec, `timeout_seconds={args.torchrec_budget}`", budgeted))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
