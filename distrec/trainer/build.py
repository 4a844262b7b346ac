"""From a config to the sharded model on this rank: tables, plan, embedding collection, DLRM, optimizers.
Shared by the trainer (distrec/train.py) and `distrec eval`.

    built = build_model(cfg, ctx, read_manifest(cfg.data.path))
    built.model, built.optimizers, built.plan, built.tables, built.chosen.report
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distrec.config import Config, ConfigError, PlanConfig, table_specs
from distrec.data.manifest import check_schema
from distrec.model.dlrm import DLRM
from distrec.trainer.dist import DistContext
from distrec.trainer.optim import make_optimizers, sparse_spec
from distrec.trainer.plan_choice import ChosenPlan, choose_plan
from distrec.trainer.plan_inputs import tables_of
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import ShardingPlan, TableConfig


def comm_precision(plan: PlanConfig) -> tuple[str, str]:
    """(forward, backward) precisions of the pooled-embedding exchange."""
    backward = plan.comm_precision if plan.comm_precision_backward == "same" else plan.comm_precision_backward
    return plan.comm_precision, backward


def check_cardinalities(cfg: Config, manifest: dict, specs) -> None:
    """Tables smaller than the data's id range would fail deep inside the lookup: say so up front."""
    for spec in specs:
        have = manifest.get("cardinalities", {}).get(spec.name, 0)
        if have > spec.num_rows:
            raise ConfigError(f"{cfg.source}: table {spec.name} has {spec.num_rows} rows but the data in "
                              f"{cfg.data.path} has ids up to {have - 1}; raise tables.cardinalities")


@dataclass
class Built:
    specs: list
    tables: list[TableConfig]
    plan: ShardingPlan
    chosen: ChosenPlan
    embeddings: ShardedEmbeddingCollection
    model: DLRM
    optimizers: list


def build_model(cfg: Config, ctx: DistContext, manifest: dict, timer=None) -> Built:
    """The data's schema checked against the config, the plan for this world size (collective when the
    planner makes it), and the model on ``ctx.device``, seeded with train.seed (so every rank starts
    from the same dense weights)."""
    check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    specs = table_specs(cfg, manifest.get("cardinalities"))
    check_cardinalities(cfg, manifest, specs)
    tables = tables_of(specs)
    chosen = choose_plan(cfg, ctx, specs, tables)
    plan = chosen.plan
    torch.manual_seed(cfg.train.seed)
    embeddings = ShardedEmbeddingCollection(tables, plan, rank=ctx.rank, group=ctx.group, seed=cfg.train.seed,
                                            device=ctx.device, optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel,
                                            timer=timer, stochastic_rounding=cfg.tables.stochastic_rounding,
                                            comm_precision=comm_precision(cfg.plan),
                                            defer_updates=cfg.train.precision == "fp16")
    model = DLRM.from_config(cfg, embeddings).to(ctx.device)
    return Built(specs, tables, plan, chosen, embeddings, model, make_optimizers(cfg.optimizer, model))
