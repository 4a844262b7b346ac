"""The trainer's check of the planner: measured per-rank memory and step time beside the planner's
estimates for the plan it ran (whatever made the plan).

    report_plan_check(cfg, ctx, plan, tables, model.embeddings, result, log)

Logged by rank 0 at the end of training and written to metrics.jsonl as ``{"kind": "plan_check"}``.
Memory: the bytes of this rank's shards and replicas and their optimizer state, measured from the
tensors, against the estimate's weights + optimizer state; the estimate's total (with workspace,
buffers and reserve) beside the process's peak RSS, which also holds Python, torch and the data loader.
Step time: the run's training time per step (evaluation and checkpoints left out) against the
slowest rank's estimate. On CPU ranks the ``cpu`` preset is used, with ``distrec plan --calibrate``
rates when there are some.
"""
from __future__ import annotations

import resource

from distrec.trainer.dist import all_gather_object
from distrec.trainer.plan_inputs import calibration_file, device_preset, tables_of, topology_of, workload_of
from sharding.planner import GB, estimate_plan
from sharding.planner.types import PlannerError


def measured_bytes(embeddings) -> tuple[int, int]:
    """(shard and replica weights, their optimizer state) held by this rank, in bytes, whichever kernel
    holds them."""
    weights = state = 0
    for _, _, w, st in embeddings.held_shards():
        weights += w.numel() * w.element_size()
        state += sum(t.numel() * t.element_size() for t in st.values() if t.dim() > 0)
    return weights, state


def report_plan_check(cfg, ctx, plan, specs, embeddings, result: dict, log) -> None:
    """Collective: every rank calls it (memory is gathered); rank 0 logs."""
    weights, state = measured_bytes(embeddings)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    measured = all_gather_object([weights, state, rss], ctx)
    if not ctx.is_main:
        return
    try:
        topo = topology_of(cfg, ctx.world_size, device_preset(cfg, ctx.device.type), calibration=calibration_file(cfg))
        ranks = estimate_plan(plan, tables_of(specs), topo, workload_of(cfg, specs, ctx.world_size))
    except PlannerError as e:
        log.info(f"plan check: no estimate ({e})")
        return
    step_s = cfg.train.global_batch_size / result["samples_per_s"] if result.get("samples_per_s") else 0.0
    estimate_s = max(r.time.total for r in ranks)
    for r, (w, s, peak) in zip(ranks, measured):
        est = r.memory.tables
        log.info(f"plan check rank {r.rank}: shards + optimizer state estimated {est / 1e6:.3f} MB, measured "
                 f"{(w + s) / 1e6:.3f} MB ({_pct(est, w + s)}); estimated total {r.memory.total / GB:.3f} GB "
                 f"(with workspace, buffers, reserve), process peak RSS {peak / GB:.3f} GB")
    source = f"calibrated, {topo.calibrated}" if topo.calibrated else "uncalibrated: run `distrec plan --calibrate`"
    log.info(f"plan check: step time estimated {estimate_s * 1e3:.1f} ms ({topo.name}, {source}), measured "
             f"{step_s * 1e3:.1f} ms ({_pct(estimate_s, step_s)})")
    log.record({"kind": "plan_check", "preset": topo.name, "calibrated": bool(topo.calibrated),
                "estimated_step_ms": estimate_s * 1e3, "measured_step_ms": step_s * 1e3,
                "ranks": [{"rank": r.rank, "estimated_tables_bytes": r.memory.tables, "measured_tables_bytes": w + s,
                           "estimated_total_bytes": r.memory.total, "peak_rss_bytes": peak}
                          for r, (w, s, peak) in zip(ranks, measured)]})


def _pct(estimate: float, measured: float) -> str:
    return f"estimate {100 * (estimate / measured - 1):+.1f} %" if measured else "nothing measured"
