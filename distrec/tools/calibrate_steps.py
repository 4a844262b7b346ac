"""The training steps ``distrec plan --calibrate`` times on this machine's ranks: the dense part alone
(``dense_step``) and the whole step of the trainer on a table-wise plan (``train_step_table_wise``), each
built by a factory that the calibration's ranks call with the batch and the config.

    step = dense_step(4096, "configs/demo.toml", ())      # a function of no arguments: one timed step
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from distrec.config import Config, TableSpec, load_config, table_specs
from distrec.data.loader import Batch, make_loader
from distrec.data.manifest import DataError, check_schema, read_manifest
from distrec.model.dlrm import DLRM
from distrec.trainer.dense_parallel import wrap_dense
from distrec.trainer.dist import DistContext
from distrec.trainer.optim import make_optimizers, sparse_spec
from distrec.trainer.plan_inputs import pooling_factors
from distrec.trainer.step import train_step
from sharding.jagged import JaggedBatch
from sharding.planner import simple_plan
from sharding.planner.calibration import LOOKUP_ROWS
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import TableConfig

SYNTHETIC_BATCHES = 8  # taken in turn, so that a step does not find the previous one's rows in cache


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


def dense_step(batch: int, config: str | None, overrides: tuple[str, ...], precision: str | None = None):
    """One dense training step of the config's DLRM at ``batch`` rows (bottom MLP, interaction, top MLP,
    loss, backward, the dense optimizer), the pooled embeddings fixed: ``--calibrate``'s dense rate, in
    ``precision`` (fp32 | bf16) in place of train.precision when given."""
    cfg = load_config(config, list(overrides) + ([f"--train.precision={precision}"] if precision else []))
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
    """One step of the trainer (``distrec.trainer.step.train_step``: the DLRM under DDP, the sharded runtime
    with the tables table-wise, both optimizers) on the batches ``step_batches`` gives, in a
    calibration rank: the whole step that ``--calibrate`` compares with its parts."""
    cfg = load_config(config, list(overrides))
    specs = table_specs(cfg)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"), "gloo")
    tables = [TableConfig(s.name, min(s.num_rows, LOOKUP_ROWS), s.dim, s.pooling, s.init, s.init_std) for s in specs]
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, ctx.world_size, "table_wise"), rank=ctx.rank,
                                     optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel)
    model = DLRM.from_config(cfg, emb)
    ddp, optimizers = wrap_dense(model, make_optimizers(cfg.optimizer, model), ctx)
    batches = step_batches(cfg, specs, tables, batch, ctx)
    return lambda: train_step(ddp, emb, optimizers, next(batches), batch * ctx.world_size)


def step_batches(cfg: Config, specs: list[TableSpec], tables: list[TableConfig], batch: int, ctx):
    """Endless per-rank batches of ``batch`` rows for the calibration's whole step: the config's training
    data read by the trainer's own loader when it is there at that batch size (its reading and decoding
    share the machine with the step, as in training), else synthetic ids."""

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

    if not Path(cfg.data.path, "manifest.json").exists():
        return None
    try:
        manifest = read_manifest(cfg.data.path)
        check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    except DataError:
        return None
    have = manifest.get("cardinalities", {})
    return manifest if all(have.get(s.name, 0) <= t.num_rows for s, t in zip(specs, tables)) else None
