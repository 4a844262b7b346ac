"""The plan a training job runs: a plan file (``plan.file``), a built-in placement (``plan.default`` a
sharding type), or, by default (``plan.default = "auto"``), the cost-model planner's plan for this job's
world size, nodes and device, the one ``distrec plan --json`` writes for the same inputs.

    chosen = choose_plan(cfg, ctx, specs, tables)
    chosen.plan, chosen.source, chosen.report   # report: per table the choice and why (logged by rank 0)

Rank 0 plans and every rank takes rank 0's plan, so ranks agree even when their calibration files differ;
a config the planner cannot plan is the same one-line error on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from distrec.config import Config, ConfigError, TableSpec
from distrec.trainer.dist import DistContext, all_gather_object
from distrec.trainer.plan_inputs import calibration_file, device_preset, plan_config
from sharding.plan import describe_plan, load_plan
from sharding.planner import simple_plan
from sharding.planner.report import format_result
from sharding.types import PlanError, ShardingPlan, TableConfig


@dataclass
class ChosenPlan:
    plan: ShardingPlan
    source: str  # where the plan came from, for the log
    report: str  # one row per table: its type and ranks (and, when planned, why)


def launcher_ranks_per_node() -> int | None:
    """Ranks per node as the launcher says (torchrun: LOCAL_WORLD_SIZE; horovodrun: HOROVOD_LOCAL_SIZE)."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("HOROVOD_LOCAL_SIZE")
    return int(local) if local else None


def ranks_per_node(cfg: Config, ctx: DistContext) -> int | None:
    """The launcher's ranks per node, for table-row-wise tables; an error when the built-in placement
    needs it and the launcher does not say."""
    local = launcher_ranks_per_node()
    if local is None and ctx.world_size > 1 and "table_row_wise" in [cfg.plan.default, *cfg.plan.overrides().values()]:
        raise ConfigError(f"{cfg.source}: table_row_wise needs the ranks per node, and the launcher did not set "
                          "LOCAL_WORLD_SIZE; launch with torchrun (or set it)")
    return local


def choose_plan(cfg: Config, ctx: DistContext, specs: list[TableSpec], tables: list[TableConfig]) -> ChosenPlan:
    """Collective when planning (every rank calls it)."""
    if cfg.plan.file:
        plan = load_plan(cfg.plan.file, tables, ctx.world_size)
        return ChosenPlan(plan, f"plan file {cfg.plan.file}", describe_plan(plan, tables))
    if cfg.plan.default != "auto":
        plan = simple_plan(tables, ctx.world_size, cfg.plan.default, cfg.plan.overrides(), ranks_per_node(cfg, ctx))
        return ChosenPlan(plan, f"built-in placement, plan.default = {cfg.plan.default!r}", describe_plan(plan, tables))
    made = all_gather_object(_planned(cfg, ctx, specs, tables) if ctx.is_main else None, ctx)[0]
    if isinstance(made, str):  # rank 0's error, raised on every rank
        raise ConfigError(made)
    return made


def _planned(cfg: Config, ctx: DistContext, specs: list[TableSpec], tables: list[TableConfig]) -> ChosenPlan | str:
    """Rank 0's plan, or the one-line reason there is none (sent to every rank instead of the plan)."""
    preset = device_preset(cfg, ctx.device.type)
    local = launcher_ranks_per_node()
    nodes = ctx.world_size // local if local and ctx.world_size % local == 0 else None
    try:
        result = plan_config(cfg, specs, ctx.world_size, preset, nodes, calibration_file(cfg))
    except ConfigError as e:  # the config contradicts itself: its own message says where
        return str(e)
    except PlanError as e:  # PlannerError is one
        return (f"{cfg.source}: the planner (plan.default = \"auto\", preset {preset}, {ctx.world_size} ranks) found "
                f"no plan: {e}; or set plan.default to a sharding type, or plan.file")
    calibrated = f"calibrated from {result.topology.calibrated}" if result.topology.calibrated else "uncalibrated"
    on_nodes = f" --nodes {result.topology.nodes}" if result.topology.nodes > 1 else ""
    source = (f"the planner (plan.default = \"auto\", preset {preset}, {calibrated}; the same plan as "
              f"`distrec plan --gpus {ctx.world_size}{on_nodes} --preset {preset} --json`)")
    return ChosenPlan(result.plan, source, format_result(result, tables))
