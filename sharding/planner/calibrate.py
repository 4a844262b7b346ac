"""Measure this machine's rates on real ranks, and keep them for later estimates (``distrec plan
--calibrate``).

    spec = CalibrationSpec(world_size=2, tables=[(1000, 16), (500, 16)], batch_per_rank=4096)
    rates = calibrate(spec)
    save_calibration("~/.cache/distrec/calibration.json", "cpu", rates)
    topo = apply_calibration(make_topology("cpu", 2), load_calibration(path, "cpu"), path)

What is measured, on every rank at once (as in training, where ranks share the machine), each at two
sizes (the slope is the rate, the intercept the fixed cost), the slowest rank counting:

- all-to-all: ``all_to_all_single`` of a small and a large buffer -> bytes/s and latency per collective;
- lookup: the sharded runtime itself (``ShardedEmbeddingCollection`` forward, backward, replica sync,
  fused optimizer) on the workload's tables placed table-wise, at the per-rank batch and 1/8 of it;
  what the cost model counts for that plan, less its all-to-all time, over the measured time is the
  rate at which the runtime moves lookup bytes (``lookup_efficiency`` = that / memory bandwidth);
- dense: the model's dense step (a caller-given factory, e.g. distrec's DLRM without its tables, or
  the Linear layers alone) -> FLOP/s;
- the whole training step (a caller-given factory: the trainer's step with the tables placed
  table-wise, on its own input path), once at the per-rank batch: what it takes beyond the runtime and
  the dense step measured apart (the data-parallel all-reduce of the MLPs, the loss, reading the input,
  caches the two evict from each other) joins the fixed cost per step, so the calibrated estimate of
  that step is what was measured;
- the same runtime with the tables replicated, once at the per-rank batch: what is left after its
  lookups, all-reduces and the fixed cost is the replicas' gradient sync (coalesce, buffer passes),
  whose rate becomes ``replica_efficiency``.

Tables keep their shapes up to LOOKUP_ROWS rows each, so a calibration of a huge config stays small.
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharding.comm import close_process_group, init_process_group
from sharding.optim import OptimSpec
from sharding.planner.estimate import estimate_plan, replica_sync_bytes
from sharding.planner.types import DenseCost, Piece, PlannerError, Topology, Workload
from sharding.types import TableConfig

CALIBRATION_VERSION = 2
LOOKUP_ROWS = 1_000_000  # rows per table at most while measuring (a calibration must fit this machine)
SMALL_FRACTION = 8  # the small size of each two-size measurement is 1/8 of the large one
# Timed runs per size; their mean counts, as the trainer's step time is a mean, less the fastest and
# the slowest fifth: on a shared machine other jobs' bursts hit single runs, and a burst must not decide
# a fit (the whole step's excess over its parts is a difference of two measurements).
REPEATS = 15
TRIM = 3  # runs dropped at each end
WARMUP = 2  # untimed first calls: allocation, optimizer state, DDP's bucket rebuild after its first step
ALLTOALL_LARGE_BYTES = 8 << 20  # per rank and step, the order of a batch's pooled rows
REPLICA_CHECK_MAX_BYTES = 256e6  # replicate the tables for the check only if they are this small


@dataclass(frozen=True)
class CalibrationSpec:
    """The workload to measure with: its tables (rows, dim), per-rank batch, optimizer, ids per sample,
    the dense model's cost per sample and a factory for its step ("module:function", called as
    ``function(batch, *dense_args)`` in each rank, returning a no-argument step), or else its Linear
    layers (in, out) to time alone."""

    world_size: int = 2
    tables: list[tuple[int, int]] = field(default_factory=lambda: [(LOOKUP_ROWS, 16)])
    batch_per_rank: int = 4096
    optimizer: str = "adagrad"
    pooling: float = 1.0
    dense: DenseCost = DenseCost(flops_per_sample=2 * 512 * 512, params=512 * 513)
    dense_step: str = ""
    dense_args: tuple = ()
    full_step: str = ""  # "module:function" called as function(batch, *dense_args), like dense_step
    dense_layers: list[tuple[int, int]] = field(default_factory=lambda: [(512, 512)])

    def table_configs(self) -> list[TableConfig]:
        return [TableConfig(f"t{i}", min(rows, LOOKUP_ROWS), dim) for i, (rows, dim) in enumerate(self.tables)]

    def batches(self) -> tuple[int, int]:
        return max(self.batch_per_rank // SMALL_FRACTION, 1), self.batch_per_rank

    def workload(self, batch: int) -> Workload:
        per_bag = float(max(round(self.pooling), 1))
        return Workload(batch_per_rank=batch, optimizer=self.optimizer, reserve_bytes=0.0,
                        pooling={t.name: per_bag for t in self.table_configs()})


def calibrate(spec: CalibrationSpec) -> dict:
    """Spawn ``spec.world_size`` gloo ranks on this machine, measure, return the rates (module doc)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank_main, args=(spec, d), nprocs=spec.world_size, join=True, start_method="spawn")
        per_rank = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(spec.world_size)]
    slowest = {k: [max(r[k][i] for r in per_rank) for i in range(len(per_rank[0][k]))] for k in per_rank[0]}
    return _rates(spec, slowest)


def _rank_main(rank: int, spec: CalibrationSpec, folder: str) -> None:
    torch.set_num_threads(1)  # torchrun's default with several ranks per machine (OMP_NUM_THREADS=1)
    store = dist.FileStore(os.path.join(folder, "store"), spec.world_size)
    init_process_group("gloo", rank=rank, world_size=spec.world_size, store=store)
    try:
        out = {"alltoall": _time_alltoall(spec), "dense": _time_dense(spec),
               "runtime": [_time_runtime(spec, rank, "table_wise", b) for b in spec.batches()]}
        if _replicable(spec):
            out["replicated"] = [_time_runtime(spec, rank, "data_parallel", spec.batch_per_rank)]
        if spec.full_step:
            out["full"] = [_timed(_factory(spec.full_step)(spec.batch_per_rank, *spec.dense_args))]
        Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        close_process_group()


def _timed(fn, repeats: int = REPEATS) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.fmean(sorted(times)[TRIM:-TRIM])


def _alltoall_sizes(world: int) -> list[int]:
    """Elements per rank: divisible by the world size."""
    return [max(b // 4 // world, 1) * world for b in (ALLTOALL_LARGE_BYTES // SMALL_FRACTION // 64,
                                                       ALLTOALL_LARGE_BYTES)]


def _time_alltoall(spec: CalibrationSpec) -> list[float]:
    out = []
    for n in _alltoall_sizes(spec.world_size):
        send, recv = torch.randn(n), torch.empty(n)
        out.append(_timed(lambda: dist.all_to_all_single(recv, send)))
    return out


def _time_runtime(spec: CalibrationSpec, rank: int, kind: str, batch: int) -> float:
    """One training step of the sharded runtime over the tables placed by ``simple_plan(kind)``."""
    from sharding.jagged import JaggedBatch
    from sharding.plan import simple_plan
    from sharding.runtime import ShardedEmbeddingCollection

    tables = spec.table_configs()
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, spec.world_size, kind), rank=rank,
                                     optim=OptimSpec(spec.optimizer, lr=0.01))  # the kernel the trainer picks
    per_bag = max(round(spec.pooling), 1)
    gen = torch.Generator().manual_seed(rank)
    values = torch.cat([torch.randint(0, t.num_rows, (batch * per_bag,), generator=gen) for t in tables])
    jb = JaggedBatch([t.name for t in tables], values, torch.full((batch * len(tables),), per_bag))

    def step():
        emb(jb).sum().backward()
        emb.sync_replica_grads()
        emb.step()

    return _timed(step)


def _time_dense(spec: CalibrationSpec) -> list[float]:
    out = []
    for b in spec.batches():
        out.append(_timed(_dense_step(spec, b)))
    return out


def _factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _dense_step(spec: CalibrationSpec, batch: int):
    if spec.dense_step:
        return _factory(spec.dense_step)(batch, *spec.dense_args)
    layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in spec.dense_layers)
    opt = torch.optim.Adam(layers.parameters(), lr=1e-4)
    xs = [torch.randn(batch, layer.in_features) for layer in layers]

    def step():
        sum(torch.relu(layer(x)).sum() for layer, x in zip(layers, xs)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _replicable(spec: CalibrationSpec) -> bool:
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
    from sharding.plan import simple_plan

    tables = spec.table_configs()
    ranks = estimate_plan(simple_plan(tables, spec.world_size, kind), tables, topo, spec.workload(batch))
    busiest = max(ranks, key=lambda r: r.time.lookup + r.time.other)
    return busiest.time.lookup + busiest.time.other, busiest.time.comm


def _rates(spec: CalibrationSpec, slowest: dict) -> dict:
    """Rates from the slowest rank's seconds; with one rank nothing leaves it, so no link rate."""
    a2a_s_per_byte, latency = 0.0, 0.0
    if spec.world_size > 1:
        a2a = [n * 4 * (spec.world_size - 1) / spec.world_size for n in _alltoall_sizes(spec.world_size)]
        a2a_s_per_byte, latency = _fit(tuple(a2a), tuple(slowest["alltoall"]))
    topo = _unit_topology(spec, 1 / a2a_s_per_byte if a2a_s_per_byte else 1e18, latency)
    points = [_runtime_points(spec, "table_wise", topo, b) for b in spec.batches()]
    lookup_s_per_byte, runtime_fixed = _fit(tuple(p[0] for p in points),
                                            tuple(t - p[1] for t, p in zip(slowest["runtime"], points)))
    flops = [3 * spec.dense.flops_per_sample * b for b in spec.batches()]
    dense_s_per_flop, dense_fixed = _fit(tuple(flops), tuple(slowest["dense"]))
    # The whole step's time beyond its parts (both fits go through the parts' large-batch points).
    beyond = slowest["full"][0] - slowest["runtime"][1] - slowest["dense"][1] if "full" in slowest else 0.0
    rates = {"lookup_bytes_per_s": 1 / lookup_s_per_byte, "dense_flops_per_s": 1 / dense_s_per_flop,
             "step_overhead_s": max(runtime_fixed + dense_fixed + beyond, 0.0), "beyond_parts_s": beyond,
             "spec": asdict(spec), "raw_seconds": slowest}
    if a2a_s_per_byte:
        rates.update(alltoall_bytes_per_s=1 / a2a_s_per_byte, collective_latency_s=latency)
    if "replicated" in slowest:
        rates.update(_replica_rate(spec, topo, slowest["replicated"][0], lookup_s_per_byte, runtime_fixed))
    return rates


def _replica_rate(spec: CalibrationSpec, topo: Topology, measured: float, lookup_s_per_byte: float,
                  fixed: float) -> dict:
    """The rate replicas' gradient sync runs at: the replicated step's time left after the lookups (at
    the lookup rate), the all-reduces and the fixed cost, over the bytes the sync moves."""
    work = spec.workload(spec.batch_per_rank)
    sync = sum(replica_sync_bytes(t, Piece(0, t.num_rows, 0, t.dim), work) for t in spec.table_configs())
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def load_calibration(path: str | os.PathLike, preset: str) -> dict | None:
    """The rates stored for ``preset``, or None when the file or the entry is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        return None
    return _read(path)["presets"].get(preset)


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlannerError(f"{path}: not a calibration file ({e})") from None
    if doc.get("version") != CALIBRATION_VERSION or not isinstance(doc.get("presets"), dict):
        raise PlannerError(f"{path}: calibration format {doc.get('version')!r}, this code reads "
                           f"{CALIBRATION_VERSION}: run `distrec plan --calibrate` again")
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
    return topo.with_(
        lookup_efficiency=rates["lookup_bytes_per_s"] / topo.hbm_bw_bytes_per_s,
        dense_efficiency=rates["dense_flops_per_s"] / topo.dense_flops_per_s,
        step_overhead_s=rates["step_overhead_s"], calibrated=f"{where} ({rates.get('measured_at', '?')})", **links)
