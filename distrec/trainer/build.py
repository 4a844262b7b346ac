"""From a config to the sharded model on this rank: tables, plan, embedding collection, DLRM, optimizers.
Shared by the trainer (distrec/train.py) and `distrec eval`.

    built = build_model(cfg, ctx, read_manifest(cfg.data.path))
    built.model, built.optimizers, built.plan, built.tables
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distrec.config import Config, ConfigError, table_specs
from distrec.data.manifest import check_schema
from distrec.model.dlrm import DLRM
from distrec.trainer.dist import DistContext
from distrec.trainer.optim import make_optimizers, sparse_spec
from distrec.trainer.plan_inputs import tables_of
from sharding.plan import load_plan
from sharding.planner import simple_plan
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import TableConfig


def check_cardinalities(cfg: Config, manifest: dict, specs) -> None:
    """Tables smaller than the data's id range would fail deep inside the lookup: say so up front."""
    for spec in specs:
        have = manifest.get("cardinalities", {}).get(spec.name, 0)
        if have > spec.num_rows:
            raise ConfigError(f"{cfg.source}: table {spec.name} has {spec.num_rows} rows but the data in "
                              f"{cfg.data.path} has ids up to {have - 1}; raise tables.cardinalities")


def ranks_per_node(cfg: Config, ctx: DistContext) -> int | None:
    """Ranks per node as the launcher says (torchrun: LOCAL_WORLD_SIZE; horovodrun: HOROVOD_LOCAL_SIZE),
    for table-row-wise tables; an error when they need it and the launcher does not say."""
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("HOROVOD_LOCAL_SIZE")
    if local:
        return int(local)
    if ctx.world_size > 1 and "table_row_wise" in [cfg.plan.default, *cfg.plan.overrides().values()]:
        raise ConfigError(f"{cfg.source}: table_row_wise needs the ranks per node, and the launcher did not set "
                          "LOCAL_WORLD_SIZE; launch with torchrun (or set it)")
    return None


@dataclass
class Built:
    specs: list
    tables: list[TableConfig]
    plan: object
    embeddings: ShardedEmbeddingCollection
    model: DLRM
    optimizers: list


def build_model(cfg: Config, ctx: DistContext, manifest: dict, timer=None) -> Built:
    """The data's schema checked against the config, the plan for this world size, and the model on
    ``ctx.device``, seeded with train.seed (so every rank starts from the same dense weights)."""
    check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    specs = table_specs(cfg, manifest.get("cardinalities"))
    check_cardinalities(cfg, manifest, specs)
    tables = tables_of(specs)
    plan = load_plan(cfg.plan.file, tables, ctx.world_size) if cfg.plan.file else \
        simple_plan(tables, ctx.world_size, cfg.plan.default, cfg.plan.overrides(), ranks_per_node(cfg, ctx))
    torch.manual_seed(cfg.train.seed)
    embeddings = ShardedEmbeddingCollection(tables, plan, rank=ctx.rank, group=ctx.group, seed=cfg.train.seed,
                                            device=ctx.device, optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel,
                                            timer=timer)
    model = DLRM.from_config(cfg, embeddings).to(ctx.device)
    return Built(specs, tables, plan, embeddings, model, make_optimizers(cfg.optimizer, model))
