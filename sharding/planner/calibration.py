"""Calibration without running anything: what to measure (the spec), measured seconds -> this machine's
rates (two sizes each: the slope is the rate, the intercept the fixed cost), and the rates kept in a
file and applied to a topology. ``sharding.calibrate`` runs the ranks that measure.

    rates = rates_from_seconds(spec, slowest)       # slowest: the slowest rank's seconds per measurement
    save_calibration("~/.cache/distrec/calibration.json", "cpu", rates)
    topo = apply_calibration(make_topology("cpu", 2), load_calibration(path, "cpu"), path)

How each rate follows from the seconds: the all-to-all's from two buffer sizes; the lookup rate is what
the cost model counts for the table-wise plan, less its all-to-all time, over the measured runtime;
the dense rate from the dense step's FLOPs, in fp32 and, when measured, under bf16 autocast (their
ratio becomes ``Topology.dense_bf16_speedup``); what the whole training step takes beyond its parts joins
the fixed cost per step, so the calibrated estimate of that step is what was measured; what is left of
the replicated runtime's step after its lookups, all-reduces and the fixed cost is the replicas'
gradient sync, whose rate becomes ``replica_efficiency``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sharding.files import atomic_write, read_versioned_json
from sharding.planner.estimate import estimate_plan, replica_sync_bytes
from sharding.planner.simple import simple_plan
from sharding.planner.types import DenseCost, PlannerError, Topology, Workload
from sharding.sharding_types import whole
from sharding.types import TableConfig

CALIBRATION_VERSION = 2
LOOKUP_ROWS = 1_000_000  # rows per table at most while measuring (a calibration must fit this machine)
SMALL_FRACTION = 8  # the small size of each two-size measurement is 1/8 of the large one
ALLTOALL_LARGE_BYTES = 8 << 20  # per rank and step, the order of a batch's pooled rows
REPLICA_CHECK_MAX_BYTES = 256e6  # replicate the tables for the check only if they are this small


@dataclass(frozen=True)
class CalibrationSpec:
    """The workload to measure with: its tables (rows, dim), per-rank batch, optimizer, ids per sample,
    the dense model's cost per sample and a factory for its step (a module-level function, so that the
    spawned ranks can import it, called as ``dense_step(batch, *dense_args, precision="fp32" or "bf16")``
    in each rank and returning a no-argument step), or else its Linear layers (in, out) to time alone."""

    world_size: int = 2
    tables: list[tuple[int, int]] = field(default_factory=lambda: [(LOOKUP_ROWS, 16)])
    batch_per_rank: int = 4096
    optimizer: str = "adagrad"
    pooling: float = 1.0
    dense: DenseCost = DenseCost(flops_per_sample=2 * 512 * 512, params=512 * 513)
    dense_step: Callable | None = None
    dense_args: tuple = ()
    full_step: Callable | None = None  # called as full_step(batch, *dense_args), like dense_step
    # The dense step is timed in fp32 and, with bf16 (where the CPU has bf16 units, or the config
    # trains in bf16), also under bf16 autocast: dense_step(batch, *dense_args, precision="bf16").
    # precision: what full_step runs in (train.precision), so its excess over the parts compares alike.
    bf16: bool = False
    precision: str = "fp32"
    dense_layers: list[tuple[int, int]] = field(default_factory=lambda: [(512, 512)])

    def table_configs(self) -> list[TableConfig]:
        return [TableConfig(f"t{i}", min(rows, LOOKUP_ROWS), dim) for i, (rows, dim) in enumerate(self.tables)]

    def batches(self) -> tuple[int, int]:
        return max(self.batch_per_rank // SMALL_FRACTION, 1), self.batch_per_rank

    def workload(self, batch: int) -> Workload:
        per_bag = float(max(round(self.pooling), 1))
        return Workload(batch_per_rank=batch, optimizer=self.optimizer, reserve_bytes=0.0,
                        pooling={t.name: per_bag for t in self.table_configs()})

    def record(self) -> dict:
        """The spec as JSON keeps it beside the rates: the step factories by their import names."""
        doc = asdict(self)
        for key in ("dense_step", "full_step"):
            fn = getattr(self, key)
            doc[key] = f"{fn.__module__}:{fn.__qualname__}" if fn else ""
        return doc


def alltoall_sizes(world: int) -> list[int]:
    """Elements per rank: divisible by the world size."""
    return [max(b // 4 // world, 1) * world for b in (ALLTOALL_LARGE_BYTES // SMALL_FRACTION // 64,
                                                       ALLTOALL_LARGE_BYTES)]


def replicable(spec: CalibrationSpec) -> bool:
    return sum(t.num_rows * t.dim * 4 for t in spec.table_configs()) <= REPLICA_CHECK_MAX_BYTES


# ---- from seconds to rates -----------------------------------------------------------------------

def _fit(x: tuple[float, float], t: tuple[float, float]) -> tuple[float, float]:
    """(seconds per unit, fixed seconds) of the line through two points; when noise makes the large
    run look no slower, the large run's average rate and no fixed cost."""
    slope = (t[1] - t[0]) / (x[1] - x[0])
    if slope <= 0:
        return t[1] / x[1], 0.0
    return slope, max(t[1] - slope * x[1], 0.0)


def _unit_topology(spec: CalibrationSpec, a2a_bytes_per_s: float, latency_s: float) -> Topology:
    """Memory moves at 1 byte/s, so the model's lookup seconds read as bytes; links as measured."""
    return Topology(world_size=spec.world_size, nodes=1, hbm_bytes=1e18, hbm_bw_bytes_per_s=1.0,
                    intra_node_bw_bytes_per_s=a2a_bytes_per_s, inter_node_bw_bytes_per_s=a2a_bytes_per_s,
                    dense_flops_per_s=1.0, lookup_efficiency=1.0, comm_efficiency=1.0, dense_efficiency=1.0,
                    collective_latency_s=latency_s, step_overhead_s=0.0, name="unit")


def _runtime_points(spec: CalibrationSpec, kind: str, topo: Topology, batch: int) -> tuple[float, float]:
    """(lookup bytes, all-to-all seconds) the model counts on the busiest rank of ``kind``'s plan."""
    tables = spec.table_configs()
    ranks = estimate_plan(simple_plan(tables, spec.world_size, kind), tables, topo, spec.workload(batch))
    busiest = max(ranks, key=lambda r: r.time.lookup + r.time.other)
    return busiest.time.lookup + busiest.time.other, busiest.time.comm


def rates_from_seconds(spec: CalibrationSpec, slowest: dict) -> dict:
    """Rates from the slowest rank's seconds; with one rank nothing leaves it, so no link rate."""
    a2a_s_per_byte, latency = 0.0, 0.0
    if spec.world_size > 1:
        a2a = [n * 4 * (spec.world_size - 1) / spec.world_size for n in alltoall_sizes(spec.world_size)]
        a2a_s_per_byte, latency = _fit(tuple(a2a), tuple(slowest["alltoall"]))
    topo = _unit_topology(spec, 1 / a2a_s_per_byte if a2a_s_per_byte else 1e18, latency)
    points = [_runtime_points(spec, "table_wise", topo, b) for b in spec.batches()]
    lookup_t = tuple(t - p[1] for t, p in zip(slowest["runtime"], points))
    # A link rate measured in a noisy moment can predict more all-to-all time than the whole runtime
    # took: then nothing is left to fit, and the runtime's seconds count as lookup seconds (said below).
    whole_runtime = min(lookup_t) <= 0
    lookup_s_per_byte, runtime_fixed = _fit(tuple(p[0] for p in points),
                                            tuple(slowest["runtime"]) if whole_runtime else lookup_t)
    dense = {key: _fit(_dense_flops(spec), tuple(slowest[key])) for key in ("dense", "dense_bf16") if key in slowest}
    # The dense step in the precision the whole step ran in: its fixed cost and its large-batch point.
    key = "dense_bf16" if spec.precision == "bf16" and "dense_bf16" in dense else "dense"
    dense_fixed = dense[key][1]
    # The whole step's time beyond its parts (both fits go through the parts' large-batch points).
    beyond = slowest["full"][0] - slowest["runtime"][1] - slowest[key][1] if "full" in slowest else 0.0
    rates = {"lookup_bytes_per_s": 1 / lookup_s_per_byte, "dense_flops_per_s": 1 / dense["dense"][0],
             "step_overhead_s": max(runtime_fixed + dense_fixed + beyond, 0.0), "beyond_parts_s": beyond,
             "spec": spec.record(), "raw_seconds": slowest}
    if "dense_bf16" in dense:
        rates["dense_bf16_flops_per_s"] = 1 / dense["dense_bf16"][0]
    if whole_runtime:
        rates["note"] = "the all-to-all rate predicted more than the runtime took; lookup rate from the whole runtime"
    if a2a_s_per_byte:
        rates.update(alltoall_bytes_per_s=1 / a2a_s_per_byte, collective_latency_s=latency)
    if "replicated" in slowest:
        rates.update(_replica_rate(spec, topo, slowest["replicated"][0], lookup_s_per_byte, runtime_fixed))
    return rates


def _dense_flops(spec: CalibrationSpec) -> tuple[float, ...]:
    """FLOPs of the dense step at each measured batch: forward + backward (2x forward)."""
    return tuple(3 * spec.dense.flops_per_sample * b for b in spec.batches())


def _replica_rate(spec: CalibrationSpec, topo: Topology, measured: float, lookup_s_per_byte: float,
                  fixed: float) -> dict:
    """The rate replicas' gradient sync runs at: the replicated step's time left after the lookups (at
    the lookup rate), the all-reduces and the fixed cost, over the bytes the sync moves."""
    work = spec.workload(spec.batch_per_rank)
    sync = sum(replica_sync_bytes(t, whole(t), work) for t in spec.table_configs())
    total, comm = _runtime_points(spec, "data_parallel", topo, spec.batch_per_rank)
    left = measured - fixed - comm - (total - sync) * lookup_s_per_byte
    rate = sync / left if left > 0 else 1 / lookup_s_per_byte
    return {"replica_bytes_per_s": rate, "replicated_step_s": measured}


# ---- storing and using ---------------------------------------------------------------------------

def save_calibration(path: str | os.PathLike, preset: str, rates: dict) -> None:
    """Keep ``rates`` for ``preset`` in the JSON file at ``path`` (other presets' entries stay)."""
    path = Path(path).expanduser()
    try:
        doc = _read(path) if path.exists() else None
    except PlannerError:  # an older format: its rates were measured differently, start afresh
        doc = None
    doc = doc or {"version": CALIBRATION_VERSION, "presets": {}}
    doc["presets"][preset] = {**rates, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "host": os.uname().nodename}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2) + "\n")


def load_calibration(path: str | os.PathLike, preset: str) -> dict | None:
    """The rates stored for ``preset``, or None when the file or the entry is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        return None
    return _read(path)["presets"].get(preset)


def _read(path: Path) -> dict:
    try:
        doc = read_versioned_json(path, "version", CALIBRATION_VERSION, PlannerError, "calibration")
    except PlannerError as e:  # another version measured differently: its rates cannot be mixed in
        raise PlannerError(f"{e}: run `distrec plan --calibrate` again") from None
    if not isinstance(doc.get("presets"), dict):
        raise PlannerError(f"{path}: a calibration file without presets: run `distrec plan --calibrate` again")
    return doc


def apply_calibration(topo: Topology, rates: dict, where: str) -> Topology:
    """The topology with measured rates in place of the assumed efficiencies and fixed costs. The
    datasheet peaks stay; the efficiencies become measured / peak."""
    links = {}
    if "alltoall_bytes_per_s" in rates:  # measured with more than one rank
        links = dict(intra_node_bw_bytes_per_s=rates["alltoall_bytes_per_s"] / topo.comm_efficiency,
                     collective_latency_s=rates["collective_latency_s"])
    if "replica_bytes_per_s" in rates:  # measured when the tables were small enough to replicate
        links["replica_efficiency"] = rates["replica_bytes_per_s"] / topo.hbm_bw_bytes_per_s
    if "dense_bf16_flops_per_s" in rates:  # measured in bf16 too: emulated bf16 gives a speedup below 1
        links["dense_bf16_speedup"] = rates["dense_bf16_flops_per_s"] / rates["dense_flops_per_s"]
    return topo.with_(
        lookup_efficiency=rates["lookup_bytes_per_s"] / topo.hbm_bw_bytes_per_s,
        dense_efficiency=rates["dense_flops_per_s"] / topo.dense_flops_per_s,
        step_overhead_s=rates["step_overhead_s"], calibrated=f"{where} ({rates.get('measured_at', '?')})", **links)
