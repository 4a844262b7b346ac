"""``distrec plan``: plan where the embedding tables go before asking for hardware, on a laptop.

    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --hbm-gb 16
    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --json plan.json    # for train --plan
    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --what-if gpus=4,8,16 --what-if hbm-gb=16,80
    distrec plan --calibrate --gpus 2 --config configs/demo.toml --planner.preset=cpu

Prints a row per table (size, chosen sharding, ranks, why, the best rejected alternative), a row per
rank (memory, lookup, communication and total ms), the imbalance, the step time and samples/s. The
numbers come from ``sharding.planner`` (presets with sourced numbers, or rates measured here by
``--calibrate``); the helpers below turn a config into its inputs, and the trainer uses them too.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
from pathlib import Path

import torch

from distrec.config import Config, TableSpec, load_config, table_specs
from sharding.plan import save_plan
from sharding.planner import (GB, DenseCost, PlannerError, TableConstraints, Topology, Workload, make_topology,
                              plan_tables)
from sharding.planner.calibrate import (CalibrationSpec, apply_calibration, calibrate, load_calibration,
                                        save_calibration)
from sharding.planner.report import format_result, format_what_if
from sharding.types import ShardingType, TableConfig

DEFAULT_CALIBRATION = "~/.cache/distrec/calibration.json"
CALIBRATION_ENV = "DISTREC_CALIBRATION"  # a path that replaces the default (tests point it elsewhere)
WHAT_IF_KEYS = ("gpus", "nodes", "batch", "hbm-gb", "preset")


# ---- config -> planner inputs (shared with the trainer's estimate log) ---------------------------

def tables_of(specs: list[TableSpec]) -> list[TableConfig]:
    return [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in specs]


def pooling_factors(cfg: Config, specs: list[TableSpec], measured: dict[str, float] | None = None) -> dict[str, float]:
    """Mean ids per sample per feature: planner.pooling_factors, else measured from data, else from
    tables.hotnesses (``data synth`` draws 1..h ids per sample uniformly: a mean of (h + 1) / 2)."""
    if cfg.planner.pooling_factors:
        return {s.name: float(x) for s, x in zip(specs, cfg.planner.pooling_factors)}
    if measured:
        return dict(measured)
    return {s.name: 1.0 if s.hotness == 1 else (s.hotness + 1) / 2 for s in specs}


def dense_layers(cfg: Config, specs: list[TableSpec]) -> list[tuple[int, int]]:
    """(in, out) of each Linear layer of the DLRM the config builds (distrec.model.dlrm)."""
    m, num_dense = cfg.model, len(cfg.schema.dense)
    bottom = [num_dense, *m.bottom_mlp] if num_dense else []
    dense_out = m.bottom_mlp[-1] if num_dense else 0
    features = len(specs) + (1 if num_dense else 0)
    if m.interaction == "dot":
        top_in, cross = features * (features - 1) // 2 + dense_out, []
    else:
        top_in = dense_out + sum(s.dim for s in specs)
        cross = ([(top_in, m.dcn_low_rank), (m.dcn_low_rank, top_in)] if m.dcn_low_rank else [(top_in, top_in)]) \
            * m.dcn_layers
    top = [top_in, *m.top_mlp, 1]
    return list(zip(bottom, bottom[1:])) + cross + list(zip(top, top[1:]))


def dense_cost(cfg: Config, specs: list[TableSpec]) -> DenseCost:
    layers = dense_layers(cfg, specs)
    macs = sum(i * o for i, o in layers)
    if cfg.model.interaction == "dot":  # pairwise dots of the feature vectors (bmm)
        features = len(specs) + (1 if cfg.schema.dense else 0)
        macs += features * features * specs[0].dim
    state = {"sgd": 0, "adagrad": 1, "adam": 2}[cfg.optimizer.dense]
    return DenseCost(flops_per_sample=2.0 * macs, params=sum(i * o + o for i, o in layers),
                     optimizer_state_per_param=state)


def constraints_of(cfg: Config) -> dict[str, TableConstraints]:
    p = cfg.planner
    names = set(p.allowed_types) | set(p.pinned_ranks)
    return {n: TableConstraints(
        allowed=tuple(ShardingType(k) for k in p.allowed_types[n]) if n in p.allowed_types else None,
        ranks=tuple(p.pinned_ranks[n]) if n in p.pinned_ranks else None) for n in sorted(names)}


def batch_per_rank(cfg: Config, world_size: int) -> int:
    """planner.batch_size, else the global batch split over the ranks (the larger share, for memory)."""
    return cfg.planner.batch_size or math.ceil(cfg.train.global_batch_size / world_size)


def calibration_file(cfg: Config, override: str | None = None) -> Path | None:
    value = override or cfg.planner.calibration or os.environ.get(CALIBRATION_ENV) or DEFAULT_CALIBRATION
    return None if value == "none" else Path(value).expanduser()


def topology_of(cfg: Config, world_size: int, preset: str | None = None, nodes: int | None = None,
                calibration: Path | None = None, **flags) -> Topology:
    """The preset's numbers, overridden by the [planner] section, then by ``flags`` (GB, GB/s), then
    by measured rates when ``calibration`` holds some for this preset."""
    p = cfg.planner
    name = preset or p.preset
    gb = {key: flags.get(key) or getattr(p, key) or None
          for key in ("hbm_gb", "mem_bw_gbps", "intra_node_gbps", "inter_node_gbps")}
    overrides = {"hbm_bytes": gb["hbm_gb"], "hbm_bw_bytes_per_s": gb["mem_bw_gbps"],
                 "intra_node_bw_bytes_per_s": gb["intra_node_gbps"], "inter_node_bw_bytes_per_s": gb["inter_node_gbps"]}
    topo = make_topology(name, world_size, nodes or p.nodes,
                         **{k: v * GB for k, v in overrides.items() if v is not None})
    rates = load_calibration(calibration, name) if calibration else None
    return apply_calibration(topo, rates, str(calibration)) if rates else topo


def workload_of(cfg: Config, specs: list[TableSpec], world_size: int, batch: int | None = None,
                measured_pooling: dict[str, float] | None = None) -> Workload:
    return Workload(batch_per_rank=batch or batch_per_rank(cfg, world_size), optimizer=cfg.optimizer.sparse,
                    pooling=pooling_factors(cfg, specs, measured_pooling), reserve_bytes=cfg.planner.reserve_gb * GB,
                    dense=dense_cost(cfg, specs))


def measure_pooling(cfg: Config, specs: list[TableSpec], max_rows: int = 100_000) -> dict[str, float]:
    """Mean ids per sample of each feature in the first rows of the training data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distrec.data.manifest import read_manifest, split_files

    manifest = read_manifest(cfg.data.path)
    first = pq.ParquetFile(split_files(cfg.data.path, manifest, cfg.data.train_split)[0])
    table = first.read_row_groups(list(range(first.num_row_groups)), columns=[s.name for s in specs]).slice(0, max_rows)
    out = {}
    for s in specs:
        col = table.column(s.name).combine_chunks()
        out[s.name] = len(col.flatten()) / max(len(col), 1) if pa.types.is_list(col.type) else 1.0
    return out


# ---- the command ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TOML file under configs/; defaults apply without one")
    p.add_argument("--gpus", type=int, help="ranks to plan for (for --calibrate: ranks to spawn here, default 2)")
    p.add_argument("--nodes", type=int, help="nodes the ranks are spread over (default planner.nodes)")
    p.add_argument("--preset", help="device: a100-80g, h100-80g, h200 or cpu (default planner.preset)")
    p.add_argument("--hbm-gb", type=float, help="device memory per rank, GB (1e9 bytes)")
    p.add_argument("--mem-bw-gbps", type=float, help="device memory bandwidth per rank, GB/s")
    p.add_argument("--intra-node-gbps", type=float, help="intra-node bandwidth per rank and direction, GB/s")
    p.add_argument("--inter-node-gbps", type=float, help="inter-node bandwidth per rank and direction, GB/s")
    p.add_argument("--batch-size", type=int, help="per rank (default: train.global_batch_size / gpus)")
    p.add_argument("--json", metavar="PLAN.json", help="write the plan for `distrec.train --plan PLAN.json`")
    p.add_argument("--what-if", action="append", default=[], metavar="KEY=V1,V2",
                   help=f"compare plans side by side; keys {', '.join(WHAT_IF_KEYS)}; repeat to combine")
    p.add_argument("--calibrate", action="store_true",
                   help="measure lookup, all-to-all and dense rates on this machine's ranks and keep them")
    p.add_argument("--calibration", help=f"rates file (default planner.calibration, ${CALIBRATION_ENV}, "
                                         f"{DEFAULT_CALIBRATION}); 'none' to ignore")
    p.add_argument("--measure-pooling", action="store_true",
                   help="measure ids per sample per feature from the data at data.path")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    cfg = load_config(args.config, rest)
    specs = _specs(cfg)
    if args.calibrate:
        return _calibrate(cfg, specs, args, rest)
    if not args.gpus:
        raise PlannerError("distrec plan needs --gpus N (the ranks to plan for)")
    measured = measure_pooling(cfg, specs) if args.measure_pooling else None
    if args.what_if:
        print(format_what_if(_what_if(cfg, specs, args, measured)))
        return 0
    result = _plan(cfg, specs, args, measured)
    print(format_result(result, tables_of(specs)))
    if args.json:
        save_plan(args.json, result.plan, tables_of(specs))
        print(f"wrote {args.json}: train with `torchrun --nproc_per_node {args.gpus} -m distrec.train "
              f"--config {args.config or '...'} --plan {args.json}`")
    return 0


def _specs(cfg: Config) -> list[TableSpec]:
    """Rows from the config, or from the data's manifest when the config gives none (as the trainer)."""
    manifest = Path(cfg.data.path) / "manifest.json"
    if not cfg.tables.cardinalities and manifest.is_file():
        from distrec.data.manifest import read_manifest

        return table_specs(cfg, read_manifest(cfg.data.path).get("cardinalities"))
    return table_specs(cfg)


def _plan(cfg: Config, specs, args, measured, gpus: int | None = None, batch: int | None = None,
          hbm_gb: float | None = None, preset: str | None = None, nodes: int | None = None):
    gpus = gpus or args.gpus
    topo = topology_of(cfg, gpus, preset or args.preset, nodes or args.nodes, calibration_file(cfg, args.calibration),
                       hbm_gb=hbm_gb or args.hbm_gb, mem_bw_gbps=args.mem_bw_gbps,
                       intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)
    work = workload_of(cfg, specs, gpus, batch or args.batch_size, measured)
    return plan_tables(tables_of(specs), topo, work, constraints_of(cfg), cfg.planner.data_parallel_max_mb * 1e6)


def parse_what_if(items: list[str]) -> list[dict[str, str]]:
    """["gpus=4,8", "hbm-gb=16,80"] -> every combination, as {"gpus": "4", "hbm-gb": "16"} ..."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or key not in WHAT_IF_KEYS or not values.strip():
            raise PlannerError(f"--what-if {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(WHAT_IF_KEYS)}")
        axes.append([(key, v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def _what_if(cfg: Config, specs, args, measured) -> list:
    out = []
    for scenario in parse_what_if(args.what_if):
        label = " ".join(f"{k}={v}" for k, v in scenario.items())
        try:
            kwargs = {"gpus": int(scenario.get("gpus", args.gpus)), "preset": scenario.get("preset"),
                      "nodes": int(scenario["nodes"]) if "nodes" in scenario else None,
                      "batch": int(scenario["batch"]) if "batch" in scenario else None,
                      "hbm_gb": float(scenario["hbm-gb"]) if "hbm-gb" in scenario else None}
        except ValueError:
            raise PlannerError(f"--what-if {label}: values must be numbers (preset: a name)") from None
        try:
            out.append((label, _plan(cfg, specs, args, measured, **kwargs)))
        except PlannerError as e:
            out.append((label, e))
    return out


def _calibrate(cfg: Config, specs, args, rest: list[str]) -> int:
    ranks = args.gpus or 2
    preset = args.preset or cfg.planner.preset
    spec = CalibrationSpec(world_size=ranks, tables=[(s.num_rows, s.dim) for s in specs],
                           batch_per_rank=args.batch_size or batch_per_rank(cfg, ranks), optimizer=cfg.optimizer.sparse,
                           pooling=sum(pooling_factors(cfg, specs).values()) / len(specs),
                           dense=dense_cost(cfg, specs), dense_step="distrec.plan_cmd:dense_step",
                           full_step="distrec.plan_cmd:train_step_table_wise", dense_args=(args.config, tuple(rest)))
    print(f"calibrating on {ranks} local rank(s) with {len(specs)} tables, batch {spec.batch_per_rank} per rank ...",
          flush=True)
    rates = calibrate(spec)
    path = calibration_file(cfg, args.calibration)
    if path is None:
        raise PlannerError("--calibrate with --calibration none: nowhere to keep the rates")
    save_calibration(path, preset, rates)
    links = (f"all-to-all {rates['alltoall_bytes_per_s'] / GB:.3f} GB/s + {rates['collective_latency_s'] * 1e3:.3f} "
             f"ms per collective" if "alltoall_bytes_per_s" in rates else "no links with one rank")
    print(f"lookup {rates['lookup_bytes_per_s'] / GB:.3f} GB/s, {links}, dense {rates['dense_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s, fixed {rates['step_overhead_s'] * 1e3:.2f} ms per step")
    if "full" in rates["raw_seconds"]:
        print(f"whole training step {rates['raw_seconds']['full'][0] * 1e3:.1f} ms, "
              f"{rates['beyond_parts_s'] * 1e3:+.1f} ms beyond its parts measured apart")
    if "replica_bytes_per_s" in rates:
        print(f"replicas' gradient sync {rates['replica_bytes_per_s'] / GB:.3f} GB/s (tables replicated: "
              f"{rates['replicated_step_s'] * 1e3:.1f} ms per runtime step)")
    print(f"wrote {path} (preset {preset}): later plans and the trainer's estimates for {preset} use these rates")
    return 0


class _PooledStub(torch.nn.Module):
    """Stands in for the embedding tables while calibrating the dense part: a fixed pooled batch."""

    def __init__(self, specs: list[TableSpec], batch: int):
        super().__init__()
        self.specs = specs
        self.pooled = torch.nn.Parameter(torch.randn(batch, sum(s.dim for s in specs)) * 0.01)

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.specs]

    def forward(self, sparse) -> torch.Tensor:
        return self.pooled


def dense_step(batch: int, config: str | None, overrides: tuple[str, ...]):
    """One dense training step of the config's DLRM at ``batch`` rows (bottom MLP, interaction, top MLP,
    loss, backward, the dense optimizer), the pooled embeddings fixed: ``--calibrate``'s dense rate."""
    import torch.nn.functional as F

    from distrec.model.dlrm import DLRM
    from distrec.optim import make_optimizers

    cfg = load_config(config, list(overrides))
    specs = table_specs(cfg)
    model = DLRM.from_config(cfg, _PooledStub(specs, batch))
    opt = make_optimizers(cfg.optimizer, model)[0]
    dense, labels = torch.randn(batch, len(cfg.schema.dense)), torch.randint(0, 2, (batch,)).float()

    def step():
        F.binary_cross_entropy_with_logits(model(dense, None), labels, reduction="sum").backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_table_wise(batch: int, config: str | None, overrides: tuple[str, ...]):
    """One step of the trainer (``distrec.loop.train_step``: the DLRM under DDP, the sharded runtime
    with the tables table-wise, both optimizers) on the batches ``step_batches`` gives, in a
    calibration rank: the whole step that ``--calibrate`` compares with its parts."""
    import torch.distributed as dist

    from distrec.dist import DistContext
    from distrec.loop import train_step
    from distrec.model.dlrm import DLRM
    from distrec.optim import make_optimizers, sparse_spec
    from distrec.train import wrap_dense
    from sharding.plan import simple_plan
    from sharding.planner.calibrate import LOOKUP_ROWS
    from sharding.runtime import ShardedEmbeddingCollection

    cfg = load_config(config, list(overrides))
    specs = table_specs(cfg)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"), "gloo")
    tables = [TableConfig(s.name, min(s.num_rows, LOOKUP_ROWS), s.dim, s.pooling) for s in specs]
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, ctx.world_size, "table_wise"), rank=ctx.rank,
                                     optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel)
    model = DLRM.from_config(cfg, emb)
    ddp, optimizers = wrap_dense(model, make_optimizers(cfg.optimizer, model), ctx)
    batches = step_batches(cfg, specs, tables, batch, ctx)
    return lambda: train_step(ddp, emb, optimizers, next(batches), batch * ctx.world_size)


SYNTHETIC_BATCHES = 8  # taken in turn, so that a step does not find the previous one's rows in cache


def step_batches(cfg: Config, specs: list[TableSpec], tables: list[TableConfig], batch: int, ctx):
    """Endless per-rank batches of ``batch`` rows for the calibration's whole step: the config's training
    data read by the trainer's own loader when it is there at that batch size (its reading and decoding
    share the machine with the step, as in training), else synthetic ids."""
    from distrec.data.loader import Batch
    from distrec.train import make_loader
    from sharding.jagged import JaggedBatch

    manifest = _training_manifest(cfg, specs, tables)
    if manifest and cfg.train.global_batch_size == batch * ctx.world_size:
        if ctx.is_main:
            print(f"whole training step on {cfg.data.path} through the trainer's loader", flush=True)
        loader = make_loader(cfg, manifest, cfg.data.train_split, ctx, train=True)
        return itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())
    per_bag = [max(round(x), 1) for x in pooling_factors(cfg, specs).values()]
    lengths = torch.tensor(per_bag).repeat_interleave(batch)
    synthetic = [Batch(torch.randn(batch, len(cfg.schema.dense)),
                       JaggedBatch([t.name for t in tables], torch.cat(
                           [torch.randint(0, t.num_rows, (batch * n,)) for t, n in zip(tables, per_bag)]), lengths),
                       torch.randint(0, 2, (batch,)).float()) for _ in range(SYNTHETIC_BATCHES)]
    return itertools.cycle(synthetic)


def _training_manifest(cfg: Config, specs: list[TableSpec], tables: list[TableConfig]) -> dict | None:
    """The manifest of ``cfg.data.path`` if it holds data of the config's schema whose ids fit ``tables``."""
    from distrec.data.manifest import DataError, check_schema, read_manifest

    if not Path(cfg.data.path, "manifest.json").exists():
        return None
    try:
        manifest = read_manifest(cfg.data.path)
        check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    except DataError:
        return None
    have = manifest.get("cardinalities", {})
    return manifest if all(have.get(s.name, 0) <= t.num_rows for s, t in zip(specs, tables)) else None
