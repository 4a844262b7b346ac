"""``distrec plan``: plan where the embedding tables go before asking for hardware, on a laptop.

    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --hbm-gb 16
    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --json plan.json    # for train --plan
    distrec plan --gpus 8 --config configs/criteo_terabyte.toml --what-if gpus=4,8,16 --what-if hbm-gb=16,80
    distrec plan --calibrate --gpus 2 --config configs/demo.toml --planner.preset=cpu

Prints a row per table (size, chosen sharding, ranks, why, the best rejected alternative), a row per
rank (memory, lookup, communication and total ms), the imbalance, the step time and samples/s. The
numbers come from ``sharding.planner`` (presets with sourced numbers, or rates measured here by
``--calibrate``, whose steps are in ``calibrate_steps``); ``distrec.trainer.plan_inputs`` turns a
config into the planner's inputs, for the trainer too.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from distrec.config import Config, TableSpec, load_config, table_specs
from distrec.trainer.plan_inputs import (CALIBRATION_ENV, DEFAULT_CALIBRATION, batch_per_rank, calibration_file,
                                         dense_cost, measure_pooling, plan_config, pooling_factors, tables_of)
from distrec.tools import calibrate_steps
from distrec.trainer.precision import BF16_FLAGS, cpu_flags
from sharding.calibrate import calibrate
from sharding.plan import save_plan
from sharding.planner import GB, PlannerError
from sharding.planner.calibration import CalibrationSpec, save_calibration
from sharding.planner.report import format_result, format_what_if

WHAT_IF_KEYS = ("gpus", "nodes", "batch", "hbm-gb", "preset")


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
    if args.json and not Path(args.json).parent.is_dir():  # before planning: no plan printed, then lost
        raise PlannerError(f"--json {args.json}: the folder {Path(args.json).parent} does not exist")
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
    return plan_config(cfg, specs, gpus or args.gpus, preset or args.preset, nodes or args.nodes,
                       calibration_file(cfg, args.calibration), batch or args.batch_size, measured,
                       hbm_gb=hbm_gb or args.hbm_gb, mem_bw_gbps=args.mem_bw_gbps,
                       intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps)


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
                           dense=dense_cost(cfg, specs), dense_step=calibrate_steps.dense_step,
                           full_step=calibrate_steps.train_step_table_wise, dense_args=(args.config, tuple(rest)),
                           bf16=cfg.train.precision == "bf16" or bool(set(BF16_FLAGS) & cpu_flags()),
                           precision=cfg.train.precision)
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
    if "dense_bf16_flops_per_s" in rates:
        print(f"dense under bf16 autocast {rates['dense_bf16_flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"({rates['dense_bf16_flops_per_s'] / rates['dense_flops_per_s']:.2f}x fp32: train.precision = bf16 "
              f"plans with it)")
    if "replica_bytes_per_s" in rates:
        print(f"replicas' gradient sync {rates['replica_bytes_per_s'] / GB:.3f} GB/s (tables replicated: "
              f"{rates['replicated_step_s'] * 1e3:.1f} ms per runtime step)")
    print(f"wrote {path} (preset {preset}): later plans and the trainer's estimates for {preset} use these rates")
    return 0


