"""The planner: where each table's shards go. Two placements, one vocabulary, one cost model.

    plan = simple_plan(tables, world_size=8, default="row_wise")              # by table sizes alone
    result = plan_tables(tables, make_topology("h100-80g", 8, hbm_bytes=16e9),
                         Workload(batch_per_rank=8192, optimizer="adagrad"))   # by estimated cost
    save_plan("plan.json", result.plan, tables)                               # sharding.plan
    print(format_result(result, tables))

Files, one per stage: ``types`` (the vocabulary), ``topology`` (device presets and where each number
comes from), ``enumerators`` (candidate shardings per table) -> ``estimate`` (the cost model: bytes and
seconds of a shard) -> ``partition`` (choose and place) -> ``report`` (what is printed); ``planner``
orchestrates them, ``simple`` is the built-in placement, ``calibration`` turns measured seconds
(``sharding.calibrate``) into rates. Nothing here runs the runtime; TorchRec is never needed.
"""
from sharding.planner.estimate import estimate_plan
from sharding.planner.planner import DEFAULT_DP_MAX_BYTES, plan_tables
from sharding.planner.report import format_result
from sharding.planner.simple import simple_plan
from sharding.planner.topology import PRESETS, make_topology
from sharding.planner.types import (GB, DenseCost, InfeasiblePlanError, MemoryCost, PlannerError, PlanResult,
                                    RankCost, ShardOption, TableConstraints, TimeCost, Topology, Workload)

__all__ = ["plan_tables", "simple_plan", "estimate_plan", "format_result", "make_topology", "PRESETS", "Topology",
           "Workload", "DenseCost", "TableConstraints", "PlanResult", "RankCost", "MemoryCost", "TimeCost",
           "ShardOption", "PlannerError", "InfeasiblePlanError", "GB", "DEFAULT_DP_MAX_BYTES"]
