"""Measure this machine's rates on real ranks, and keep them for later estimates (``distrec plan
--calibrate``).

    spec = CalibrationSpec(world_size=2, tables=[(1000, 16), (500, 16)], batch_per_rank=4096)
    rates = calibrate(spec)           # sharding.planner.calibration keeps and applies them

What is measured, on every rank at once (as in training, where ranks share the machine), each at two
sizes (the slope is the rate, the intercept the fixed cost), the slowest rank counting:

- all-to-all: ``all_to_all_single`` of a small and a large buffer -> bytes/s and latency per collective;
- lookup: the sharded runtime itself (``ShardedEmbeddingCollection`` forward, backward, replica sync,
  fused optimizer) on the workload's tables placed table-wise, at the per-rank batch and 1/8 of it;
  what the cost model counts for that plan, less its all-to-all time, over the measured time is the
  rate at which the runtime moves lookup bytes (``lookup_efficiency`` = that / memory bandwidth);
- dense: the model's dense step (a caller-given factory, e.g. distrec's DLRM without its tables, or
  the Linear layers alone) -> FLOP/s, in fp32 and, with ``spec.bf16``, under bf16 autocast;
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

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sharding.comm import close_process_group, init_process_group
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec
from sharding.planner.calibration import CalibrationSpec, alltoall_sizes, rates_from_seconds, replicable
from sharding.planner.simple import simple_plan
from sharding.runtime import ShardedEmbeddingCollection

# Timed runs per size; their mean counts, as the trainer's step time is a mean, less the fastest and
# the slowest fifth: on a shared machine other jobs' bursts hit single runs, and a burst must not decide
# a fit (the whole step's excess over its parts is a difference of two measurements).
REPEATS = 15
TRIM = 3  # runs dropped at each end
WARMUP = 2  # untimed first calls: allocation, optimizer state, DDP's bucket rebuild after its first step


def calibrate(spec: CalibrationSpec) -> dict:
    """Spawn ``spec.world_size`` gloo ranks on this machine, measure, return the rates (module doc)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank_main, args=(spec, d), nprocs=spec.world_size, join=True, start_method="spawn")
        per_rank = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(spec.world_size)]
    slowest = {k: [max(r[k][i] for r in per_rank) for i in range(len(per_rank[0][k]))] for k in per_rank[0]}
    return rates_from_seconds(spec, slowest)


def _rank_main(rank: int, spec: CalibrationSpec, folder: str) -> None:
    torch.set_num_threads(1)  # torchrun's default with several ranks per machine (OMP_NUM_THREADS=1)
    store = dist.FileStore(os.path.join(folder, "store"), spec.world_size)
    init_process_group("gloo", rank=rank, world_size=spec.world_size, store=store)
    try:
        out = {"alltoall": _time_alltoall(spec), "dense": _time_dense(spec, "fp32"),
               "runtime": [_time_runtime(spec, rank, "table_wise", b) for b in spec.batches()]}
        if spec.bf16:
            out["dense_bf16"] = _time_dense(spec, "bf16")
        if replicable(spec):
            out["replicated"] = [_time_runtime(spec, rank, "data_parallel", spec.batch_per_rank)]
        if spec.full_step:
            out["full"] = [_timed(spec.full_step(spec.batch_per_rank, *spec.dense_args))]
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


def _time_alltoall(spec: CalibrationSpec) -> list[float]:
    out = []
    for n in alltoall_sizes(spec.world_size):
        send, recv = torch.randn(n), torch.empty(n)
        out.append(_timed(lambda: dist.all_to_all_single(recv, send)))
    return out


def _time_runtime(spec: CalibrationSpec, rank: int, kind: str, batch: int) -> float:
    """One training step of the sharded runtime over the tables placed by ``simple_plan(kind)``."""
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


def _time_dense(spec: CalibrationSpec, precision: str) -> list[float]:
    return [_timed(_dense_step(spec, b, precision)) for b in spec.batches()]


def _dense_step(spec: CalibrationSpec, batch: int, precision: str):
    """The dense step at ``batch`` rows in ``precision`` (fp32, or bf16: its matmuls under autocast)."""
    if spec.dense_step:
        return spec.dense_step(batch, *spec.dense_args, precision=precision)
    layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in spec.dense_layers)
    opt = torch.optim.Adam(layers.parameters(), lr=1e-4)
    xs = [torch.randn(batch, layer.in_features) for layer in layers]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(torch.relu(layer(x)).float().sum() for layer, x in zip(layers, xs))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


