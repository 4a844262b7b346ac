"""Projection to 8, 16 and 64 H100s: the planner's cost model (``h100-80g`` preset), its lookup and
communication efficiencies scaled by how far the model's structure was off on this run's CPU ranks.
Modelled, not measured: the report labels it so.

    doc["projection"] = projection(doc, out)   # {"model", "calibration": {...}, "points": [{"gpus": 8, ...}]}

What carries over from a CPU run to GPUs is not the CPU's rates (a CPU's memory and loopback are 10-100x
slower than HBM and NVLink; the preset already holds the GPU's) but how far the model's *structure* is
off: the bytes and calls it counts for a lookup or an all-to-all against what the runtime did. So the
CPU estimate uses this machine's measured rates (``distrec plan --calibrate``, kept by the sweep as
``calibration.json`` in the report folder); then, for the sync runs with the planner's plan, the slowest
rank's estimated lookup (forward) and forward all-to-all times are compared with the measured step-time
breakdown (lookup; input + output all-to-all), term by term, on the runs with no more ranks than the
machine has cores (beyond that the ranks time-share the cores and an all-to-all mostly waits for a
descheduled rank). With the rates measured, a ratio near 1
says the structure holds; the H100 preset's ``lookup_efficiency`` and ``comm_efficiency`` are multiplied
by the median estimated / measured ratios (at most 1: a measurement never makes the model faster than
its preset). Without a calibration the ratios compare the ``cpu`` preset's assumed rates with this
machine and mostly measure the machine: the report says which it used.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from distrec.tools.bench.matrix import MODELS
from distrec.tools.bench.runner import CALIBRATION_FILE, ROOT

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


def cpu_topology(ranks: int, rates_file: Path | None):
    """The ``cpu`` preset on ``ranks``, with this machine's measured rates when ``rates_file`` has them."""
    from sharding.planner import make_topology
    from sharding.planner.calibration import apply_calibration, load_calibration

    topo = make_topology("cpu", ranks)
    rates = load_calibration(rates_file, "cpu") if rates_file else None
    return apply_calibration(topo, rates, str(rates_file)) if rates else topo


def cpu_estimate(model: str, ranks: int, batch: int, plan_path: Path, rates_file: Path | None = None):
    """The TimeCost of the slowest rank for the plan a run used, on the ``cpu`` preset (measured rates
    when given)."""
    from sharding.plan import load_plan
    from sharding.planner import estimate_plan

    tables, work, _, _ = model_inputs(model, ranks, -(-batch // ranks))
    ranks_cost = estimate_plan(load_plan(plan_path, tables, ranks), tables, cpu_topology(ranks, rates_file), work)
    return max(ranks_cost, key=lambda r: r.time.total).time


def calibration(doc: dict, model: str, out: Path) -> dict:
    """Median estimated / measured ratios of lookup and all-to-all time, with the run ids used, and
    whether the estimates used measured rates (``rates``: the file) or the preset's."""
    rates = out / CALIBRATION_FILE if (out / CALIBRATION_FILE).exists() else None
    cores = doc.get("machine", {}).get("cores") or 1
    lookup, comm, used = [], [], []
    for r in doc["runs"]:
        if (r["status"], r["engine"], r["strategy"], r["model"], r.get("purpose", "speed")) != \
                ("ok", "sync", "planner", model, "speed") or "breakdown_ms" not in r:
            continue
        if r["ranks"] > cores:  # time-shared cores: an exposed all-to-all there is mostly waiting for a
            continue            # descheduled rank, which no GPU run has, so it says nothing of the model
        plan = out / "plans" / f"{model}-r{r['ranks']}-b{r['global_batch']}.json"
        if not plan.exists():
            continue
        t, b = cpu_estimate(model, r["ranks"], r["global_batch"], plan, rates), r["breakdown_ms"]
        lookup.append(1e3 * t.lookup_fwd / max(b["lookup"], 1e-6))
        if r["ranks"] > 1:
            comm.append(1e3 * t.comm_fwd / max(b["input_a2a"] + b["output_a2a"], 1e-6))
        used.append(r["run_id"])
    return {"lookup_ratio": statistics.median(lookup) if lookup else 1.0,
            "comm_ratio": statistics.median(comm) if comm else 1.0, "runs": used,
            "rates": str(rates) if rates else None}


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
            slowest = max(plan_tables(tables, topo, work, constraints, dp_max).ranks, key=lambda r: r.time.total)
        except PlannerError as e:
            point[name] = {"error": str(e).splitlines()[0]}
            continue
        t = slowest.time
        point[name] = {"step_ms": 1e3 * t.total, "samples_per_s": gpus * batch_per_rank / t.total,
                       "parts_ms": {"lookup": 1e3 * t.lookup, "all_to_all": 1e3 * (t.comm_fwd + t.comm_bwd),
                                    "allreduce": 1e3 * t.allreduce, "dense": 1e3 * t.dense, "other": 1e3 * t.other}}
    return point


def projection(doc: dict, out: Path) -> dict:
    """The projection for the heaviest model measured (heavy, else demo), weak scaling at the per-rank
    batch of the measured weak-scaling runs; ``out``: the report folder (plans, calibration.json)."""
    models = doc["options"]["models"]
    model = "heavy" if "heavy" in models else models[0]
    cal = calibration(doc, model, out)
    batch = MODELS[model].global_batch // 2
    return {"model": model, "preset": "h100-80g", "gpus_per_node": GPUS_PER_NODE, "calibration": cal,
            "points": [project_point(model, g, batch, cal) for g in GPUS]}
