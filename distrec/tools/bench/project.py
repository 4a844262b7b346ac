"""Projection to 8, 16 and 64 H100s: the planner's cost model (``h100-80g`` preset), its lookup and
communication efficiencies scaled by how far this run's CPU measurements fell from the same model's
``cpu``-preset estimates. Modelled, not measured: the report labels it so.

    doc["projection"] = projection(doc)   # {"model", "calibration": {...}, "points": [{"gpus": 8, ...}]}

Calibration: for the sync runs with the planner's plan, the slowest rank's estimated lookup (forward)
and forward all-to-all times on the ``cpu`` preset are compared with the measured step-time breakdown
(lookup; input + output all-to-all). The H100 preset's ``lookup_efficiency`` and ``comm_efficiency``
are multiplied by the median estimated / measured ratios (at most 1: a measurement never makes the
model faster than its preset).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from distrec.tools.bench.matrix import MODELS
from distrec.tools.bench.runner import ROOT

GPUS = (8, 16, 64)
GPUS_PER_NODE = 8


def model_inputs(model: str, world: int, batch_per_rank: int):
    """(tables, workload, constraints, dp_max_bytes) of a bench model as the planner sees it."""
    from distrec.config import load_config, table_specs
    from distrec.trainer.plan_inputs import constraints_of, tables_of, workload_of

    m = MODELS[model]
    cfg = load_config(str(ROOT / m.config), list(m.overrides))
    specs = table_specs(cfg)
    return (tables_of(specs), workload_of(cfg, specs, world, batch_per_rank), constraints_of(cfg),
            cfg.planner.data_parallel_max_mb * 1e6)


def cpu_estimate(model: str, ranks: int, batch: int, plan_path: Path):
    """The ``cpu`` preset's TimeCost of the slowest rank for the plan a run used."""
    from sharding.plan import load_plan
    from sharding.planner import estimate_plan, make_topology

    tables, work, _, _ = model_inputs(model, ranks, -(-batch // ranks))
    ranks_cost = estimate_plan(load_plan(plan_path, tables, ranks), tables, make_topology("cpu", ranks), work)
    return max(ranks_cost, key=lambda r: r.time.total).time


def calibration(doc: dict, model: str, out: Path) -> dict:
    """Median estimated / measured ratios of lookup and all-to-all time, with the run ids used."""
    lookup, comm, used = [], [], []
    for r in doc["runs"]:
        if (r["status"], r["engine"], r["strategy"], r["model"]) != ("ok", "sync", "planner", model) \
                or "breakdown_ms" not in r:
            continue
        plan = out / "plans" / f"{model}-r{r['ranks']}-b{r['global_batch']}.json"
        if not plan.exists():
            continue
        t, b = cpu_estimate(model, r["ranks"], r["global_batch"], plan), r["breakdown_ms"]
        lookup.append(1e3 * t.lookup_fwd / max(b["lookup"], 1e-6))
        if r["ranks"] > 1:
            comm.append(1e3 * t.comm_fwd / max(b["input_a2a"] + b["output_a2a"], 1e-6))
        used.append(r["run_id"])
    return {"lookup_ratio": statistics.median(lookup) if lookup else 1.0,
            "comm_ratio": statistics.median(comm) if comm else 1.0, "runs": used}


def project_point(model: str, gpus: int, batch_per_rank: int, cal: dict) -> dict:
    """Planner plan and estimate on ``gpus`` H100s, preset and calibrated."""
    from sharding.planner import PlannerError, make_topology, plan_tables

    tables, work, constraints, dp_max = model_inputs(model, gpus, batch_per_rank)
    nodes = max(1, gpus // GPUS_PER_NODE)
    preset = make_topology("h100-80g", gpus, nodes)
    tuned = make_topology("h100-80g", gpus, nodes,
                          lookup_efficiency=preset.lookup_efficiency * min(cal["lookup_ratio"], 1.0),
                          comm_efficiency=preset.comm_efficiency * min(cal["comm_ratio"], 1.0))
    point = {"gpus": gpus, "nodes": nodes, "batch_per_rank": batch_per_rank}
    for name, topo in (("preset", preset), ("calibrated", tuned)):
        try:
            step = max(r.time.total for r in plan_tables(tables, topo, work, constraints, dp_max).ranks)
        except PlannerError as e:
            point[name] = {"error": str(e).splitlines()[0]}
            continue
        point[name] = {"step_ms": 1e3 * step, "samples_per_s": gpus * batch_per_rank / step}
    return point


def projection(doc: dict) -> dict:
    """The projection for the heaviest model measured (heavy, else demo), weak scaling at the per-rank
    batch of the measured weak-scaling runs."""
    models = doc["options"]["models"]
    model = "heavy" if "heavy" in models else models[0]
    out = Path(doc["runs"][0]["run_dir"]).parents[1] if doc["runs"] and doc["runs"][0].get("run_dir") else Path(".")
    cal = calibration(doc, model, out)
    batch = MODELS[model].global_batch // 2
    return {"model": model, "preset": "h100-80g", "gpus_per_node": GPUS_PER_NODE, "calibration": cal,
            "points": [project_point(model, g, batch, cal) for g in GPUS]}
