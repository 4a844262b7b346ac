"""Measure this machine's lookup, all-to-all and dense rates on real ranks, and keep them for later
estimates (``distrec plan --calibrate``).

    rates = calibrate(CalibrationSpec(world_size=2, tables=[(1000, 16), (500, 16)], batch_per_rank=4096,
                                      optimizer="adagrad", dense_layers=[(13, 64), (64, 16)]))
    save_calibration("~/.cache/distrec/calibration.json", "cpu", rates)
    topo = apply_calibration(make_topology("cpu", 2), load_calibration(path, "cpu"), path)

Every rank measures at the same time (as in training, where ranks share the machine's cores and
memory), each measurement twice at two sizes: the slope is the rate, the intercept the fixed cost.
The slowest rank's time counts. The shapes are the workload's own (dim, batch, optimizer, MLP), so
what is measured is what the estimate is used for.
"""
from __future__ import annotations

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
import torch.nn.functional as F

from sharding.optim import OptimSpec, SparseOptimizer
from sharding.planner.estimate import FWD_COLLECTIVES, BWD_COLLECTIVES, lookup_bytes
from sharding.planner.types import Piece, PlannerError, Topology, Workload
from sharding.types import ShardingType, TableConfig

CALIBRATION_VERSION = 1
LOOKUP_ROWS = 1_000_000  # large enough that rows come from memory, not cache (tens of MB at dim 16)
SMALL_FRACTION = 8  # the small size of each two-size measurement is 1/8 of the large one
REPEATS = 7  # timed runs per size; the median counts
ALLTOALL_LARGE_BYTES = 8 << 20  # per rank and step, the order of a batch's pooled rows


@dataclass(frozen=True)
class CalibrationSpec:
    """The workload to measure with: its tables (rows, dim), per-rank batch, optimizer, ids per sample,
    and the dense model's Linear layers (in, out). Tables are capped at LOOKUP_ROWS rows each."""

    world_size: int = 2
    tables: list[tuple[int, int]] = field(default_factory=lambda: [(LOOKUP_ROWS, 16)])
    batch_per_rank: int = 4096
    optimizer: str = "adagrad"
    pooling: float = 1.0
    dense_layers: list[tuple[int, int]] = field(default_factory=lambda: [(512, 512)])

    def share(self, rank: int) -> list[TableConfig]:
        """The tables rank ``rank`` looks up, as table-wise shards dealt round-robin would give it."""
        return [TableConfig(f"t{i}", min(rows, LOOKUP_ROWS), dim)
                for i, (rows, dim) in enumerate(self.tables) if i % self.world_size == rank]


def calibrate(spec: CalibrationSpec) -> dict:
    """Spawn ``spec.world_size`` gloo ranks on this machine, measure, return the rates (see module doc)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank_main, args=(spec, d), nprocs=spec.world_size, join=True, start_method="spawn")
        per_rank = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(spec.world_size)]
    return _rates(spec, per_rank)


def _rank_main(rank: int, spec: CalibrationSpec, folder: str) -> None:
    torch.set_num_threads(1)  # torchrun's default with several ranks per machine (OMP_NUM_THREADS=1)
    store = dist.FileStore(os.path.join(folder, "store"), spec.world_size)
    dist.init_process_group("gloo", rank=rank, world_size=spec.world_size, store=store)
    try:
        out = {"lookup": _time_lookup(spec, rank), "alltoall": _time_alltoall(spec), "dense": _time_dense(spec),
               "runtime": [_time_runtime(spec, rank)] * 2}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _timed(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up: first calls allocate
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_lookup(spec: CalibrationSpec, rank: int) -> list[float]:
    """Fused lookup + backward + optimizer over this rank's share of the tables, one embedding_bag per
    width as the runtime does, every rank's samples (table-wise shards) at two batch sizes."""
    tables = spec.share(rank)
    by_width: dict[int, list[TableConfig]] = {}
    for t in tables:
        by_width.setdefault(t.dim, []).append(t)
    weights = {w: torch.nn.Parameter(torch.randn(sum(t.num_rows for t in ts), w) * 0.01) for w, ts in by_width.items()}
    opt = SparseOptimizer(list(weights.values()), spec.optimizer, lr=0.01)
    out = []
    for batch in _batches(spec):
        bags = batch * spec.world_size
        inputs = {w: _fused_ids(ts, bags, spec.pooling) for w, ts in by_width.items()}

        def step():
            loss = sum(F.embedding_bag(ids, weights[w], offsets, mode="sum", sparse=True).sum()
                       for w, (ids, offsets) in inputs.items())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out.append(_timed(step) if tables else 0.0)
    return out


def _fused_ids(tables: list[TableConfig], bags: int, pooling: float) -> tuple[torch.Tensor, torch.Tensor]:
    per_bag = max(round(pooling), 1)
    ids, start = [], 0
    for t in tables:
        ids.append(torch.randint(0, t.num_rows, (bags * per_bag,)) + start)
        start += t.num_rows
    return torch.cat(ids), torch.arange(0, bags * per_bag * len(tables), per_bag)


def _batches(spec: CalibrationSpec) -> tuple[int, int]:
    return max(spec.batch_per_rank // SMALL_FRACTION, 1), spec.batch_per_rank


def _time_alltoall(spec: CalibrationSpec) -> list[float]:
    w, out = spec.world_size, []
    for nbytes in (ALLTOALL_LARGE_BYTES // SMALL_FRACTION // 64, ALLTOALL_LARGE_BYTES):
        n = max(nbytes // 4 // w, 1) * w
        send, recv = torch.randn(n), torch.empty(n)
        out.append(_timed(lambda: dist.all_to_all_single(recv, send)))
    return out


def _time_dense(spec: CalibrationSpec) -> list[float]:
    """The model's Linear layers (each on its own input: bottom and top MLPs are not one chain), forward,
    backward and an Adam step."""
    layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in spec.dense_layers)
    opt = torch.optim.Adam(layers.parameters(), lr=1e-4)
    out = []
    for b in _batches(spec):
        xs = [torch.randn(b, layer.in_features) for layer in layers]

        def step():
            sum(torch.relu(layer(x)).sum() for layer, x in zip(layers, xs)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out.append(_timed(step))
    return out


def _time_runtime(spec: CalibrationSpec, rank: int) -> float:
    """One step of the sharded runtime with the workload's number of tables and almost no data: its
    fixed cost (Python, routing set-up, the collectives' latencies)."""
    from sharding.jagged import JaggedBatch
    from sharding.plan import simple_plan
    from sharding.runtime import ShardedEmbeddingCollection

    tables = [TableConfig(f"t{i}", 64, dim) for i, (_, dim) in enumerate(spec.tables)]
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, spec.world_size, "table_wise"), rank=rank,
                                     optim=OptimSpec(spec.optimizer, lr=0.01))  # the kernel the trainer picks
    batch = 2
    jb = JaggedBatch([t.name for t in tables], torch.zeros(batch * len(tables), dtype=torch.int64),
                     torch.ones(batch * len(tables), dtype=torch.int64))

    def step():
        emb(jb).sum().backward()
        emb.sync_replica_grads()
        emb.step()

    return _timed(step)


def _fit(x: tuple[float, float], t: tuple[float, float]) -> tuple[float, float]:
    """(seconds per unit, fixed seconds) of a line through two points; a faster large run (noise) gives
    the rate of the large run alone."""
    slope = (t[1] - t[0]) / (x[1] - x[0])
    if slope <= 0:
        return t[1] / x[1], 0.0
    return slope, max(t[1] - slope * x[1], 0.0)


def _rates(spec: CalibrationSpec, per_rank: list[dict]) -> dict:
    slowest = {k: [max(r[k][i] for r in per_rank) for i in range(2)] for k in per_rank[0]}
    batches = _batches(spec)
    nbytes = [max(_lookup_bytes(spec, rank, b) for rank in range(spec.world_size)) for b in batches]
    s_per_byte, lookup_fixed = _fit(tuple(nbytes), tuple(slowest["lookup"]))
    w = spec.world_size
    a2a = [max(b // 4 // w, 1) * w * 4 * (w - 1) / w for b in (ALLTOALL_LARGE_BYTES // SMALL_FRACTION // 64,
                                                                ALLTOALL_LARGE_BYTES)]
    a2a_s_per_byte, latency = _fit(tuple(a2a), tuple(slowest["alltoall"]))
    flops = [3 * 2 * sum(i * o for i, o in spec.dense_layers) * b for b in batches]
    dense_s_per_flop, dense_fixed = _fit(tuple(flops), tuple(slowest["dense"]))
    return {"lookup_bytes_per_s": 1 / s_per_byte, "alltoall_bytes_per_s": 1 / a2a_s_per_byte,
            "collective_latency_s": latency, "dense_flops_per_s": 1 / dense_s_per_flop,
            # The runtime's fixed cost holds a lookup's and the collectives' (counted apart): not twice.
            "step_overhead_s": max(slowest["runtime"][0] - (FWD_COLLECTIVES + BWD_COLLECTIVES) * latency, 0.0)
            + dense_fixed,
            "lookup_fixed_s": lookup_fixed, "spec": asdict(spec), "raw_seconds": slowest}


def _lookup_bytes(spec: CalibrationSpec, rank: int, batch: int) -> float:
    """What the cost model counts for the lookups ``_time_lookup`` runs on ``rank``."""
    work = Workload(batch_per_rank=batch, optimizer=spec.optimizer,
                    pooling={t.name: float(max(round(spec.pooling), 1)) for t in spec.share(rank)})
    return sum(sum(lookup_bytes(t, Piece(0, t.num_rows, 0, t.dim), ShardingType.TABLE_WISE, work, spec.world_size))
               for t in spec.share(rank))


# ---- storing and using ---------------------------------------------------------------------------

def save_calibration(path: str | os.PathLike, preset: str, rates: dict) -> None:
    """Keep ``rates`` for ``preset`` in the JSON file at ``path`` (other presets' entries stay)."""
    path = Path(path).expanduser()
    doc = _read(path) if path.exists() else {"version": CALIBRATION_VERSION, "presets": {}}
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
        raise PlannerError(f"{path}: calibration format {doc.get('version')!r}, this code reads {CALIBRATION_VERSION}")
    return doc


def apply_calibration(topo: Topology, rates: dict, where: str) -> Topology:
    """The topology with measured rates in place of the assumed efficiencies and fixed costs. The
    datasheet peaks stay; the efficiencies become measured / peak."""
    return topo.with_(
        lookup_efficiency=rates["lookup_bytes_per_s"] / topo.hbm_bw_bytes_per_s,
        intra_node_bw_bytes_per_s=rates["alltoall_bytes_per_s"] / topo.comm_efficiency,
        dense_efficiency=rates["dense_flops_per_s"] / topo.dense_flops_per_s,
        collective_latency_s=rates["collective_latency_s"],
        step_overhead_s=rates["step_overhead_s"],
        calibrated=f"{where} ({rates.get('measured_at', '?')})")
