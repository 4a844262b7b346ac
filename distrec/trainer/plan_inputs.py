"""The planner's inputs from a config: tables, ids per sample, the dense model's cost, constraints,
the topology (preset, overrides, calibrated rates) and the workload; and the plan they give. Used by
``distrec plan``, the trainer (its plan when ``plan.default = "auto"``, and its plan check) and calibration.

    topo = topology_of(cfg, world_size=8, preset="h100-80g", calibration=calibration_file(cfg))
    work = workload_of(cfg, table_specs(cfg), world_size=8)
    result = plan_config(cfg, table_specs(cfg), world_size=8)   # what `distrec plan --gpus 8` prints
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from distrec.config import Config, ConfigError, TableSpec
from sharding.planner import (GB, DenseCost, PlanResult, TableConstraints, Topology, Workload, make_topology,
                              plan_tables)
from sharding.planner.calibration import apply_calibration, load_calibration
from sharding.types import ShardingType, TableConfig


DEFAULT_CALIBRATION = "~/.cache/distrec/calibration.json"


CALIBRATION_ENV = "DISTREC_CALIBRATION"  # a path that replaces the default (tests point it elsewhere)


def tables_of(specs: list[TableSpec]) -> list[TableConfig]:
    return [TableConfig(s.name, s.num_rows, s.dim, s.pooling, s.init, s.init_std, s.precision) for s in specs]


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
    """planner.allowed_types and planner.pinned_ranks; with ``plan.default = "auto"`` the [plan] section's
    per-table lists (``row_wise = ["C1"]``) fix those tables' types, and the planner places them."""
    p = cfg.planner
    allowed = {n: tuple(ShardingType(k) for k in kinds) for n, kinds in p.allowed_types.items()}
    for name, kind in (cfg.plan.overrides().items() if cfg.plan.default == "auto" else ()):
        if name in allowed and ShardingType(kind) not in allowed[name]:
            raise ConfigError(f"{cfg.source}: table {name} is listed in plan.{kind} but planner.allowed_types "
                              f"gives it only {', '.join(k.value for k in allowed[name])}")
        allowed[name] = (ShardingType(kind),)
    names = set(allowed) | set(p.pinned_ranks)
    return {n: TableConstraints(allowed=allowed.get(n), ranks=tuple(p.pinned_ranks[n]) if n in p.pinned_ranks else None)
            for n in sorted(names)}


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


def device_preset(cfg: Config, device_type: str) -> str:
    """The preset a job on this device plans and estimates with: ``cpu`` on CPU ranks (a GPU preset
    would price a CPU run with HBM numbers), else planner.preset."""
    return "cpu" if device_type == "cpu" else cfg.planner.preset


def plan_config(cfg: Config, specs: list[TableSpec], world_size: int, preset: str | None = None,
                nodes: int | None = None, calibration: Path | None = None, batch: int | None = None,
                measured_pooling: dict[str, float] | None = None, **flags) -> PlanResult:
    """The cost-model planner's plan for the config's tables on ``world_size`` ranks (``flags`` as in
    ``topology_of``): `distrec plan` and the trainer's ``plan.default = "auto"`` both plan through here,
    so the same inputs give the same plan."""
    topo = topology_of(cfg, world_size, preset, nodes, calibration, **flags)
    work = workload_of(cfg, specs, world_size, batch, measured_pooling)
    return plan_tables(tables_of(specs), topo, work, constraints_of(cfg), cfg.planner.data_parallel_max_mb * 1e6)


def workload_of(cfg: Config, specs: list[TableSpec], world_size: int, batch: int | None = None,
                measured_pooling: dict[str, float] | None = None) -> Workload:
    return Workload(batch_per_rank=batch or batch_per_rank(cfg, world_size), optimizer=cfg.optimizer.sparse,
                    pooling=pooling_factors(cfg, specs, measured_pooling), reserve_bytes=cfg.planner.reserve_gb * GB,
                    dense=dense_cost(cfg, specs), **precisions_of(cfg))


def precisions_of(cfg: Config) -> dict[str, str]:
    """The Workload's precisions from [plan] and train.precision (comm_precision_backward "same": the
    forward's). The tables' storage precisions travel in their TableConfigs (``tables_of``)."""
    p = cfg.plan
    backward = p.comm_precision if p.comm_precision_backward == "same" else p.comm_precision_backward
    return dict(comm_precision=p.comm_precision, comm_precision_backward=backward,
                dense_comm_precision=p.dense_comm_precision, dense_precision=cfg.train.precision)


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
