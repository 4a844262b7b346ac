"""Train a DLRM: config -> distributed init -> plan -> model -> loop.

    torchrun --standalone --nproc_per_node 2 -m distrec.train --config configs/demo.toml --train.epochs=2
    python -m distrec.train --config configs/demo.toml          # one process, no process group
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from distrec.config import Config, ConfigError, dump_toml, load_config, table_specs
from distrec.data.loader import make_loader
from distrec.data.manifest import DataError, check_schema, read_manifest
from distrec.model.dlrm import DLRM
from distrec.trainer.checkpoint import CheckpointError, agreed, check_writable, open_for_resume
from distrec.trainer.dense_parallel import wrap_dense
from distrec.trainer.dist import DistContext, init_distributed, shutdown
from distrec.trainer.locks import RunLockError, lock_run_dirs, release
from distrec.trainer.logs import MetricsLog, write_resolved_config
from distrec.trainer.loop import report_breakdown, train_loop
from distrec.trainer.optim import make_optimizers, sparse_spec
from distrec.trainer.phases import PhaseTimer
from distrec.trainer.plan_check import report_plan_check
from distrec.trainer.schedule import Schedule, lr_notes
from distrec.trainer.state import Position, restore
from sharding.plan import describe_plan, load_plan
from sharding.planner import simple_plan
from sharding.runtime import InputError, ShardedEmbeddingCollection
from sharding.types import PlanError, TableConfig


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


def resume(cfg: Config, ctx: DistContext, model, embeddings, optimizers, note, schedule=None) -> Position:
    """Where to start: step 0, or the newest checkpoint that verifies when ``checkpoint.resume`` is set
    (each one passed over, and finding none, is told to ``note``)."""
    if not (cfg.checkpoint.resume and cfg.checkpoint.dir):
        return Position()
    ckpt = open_for_resume(cfg.checkpoint.dir, ctx, note)
    if ckpt is None:
        note(f"checkpoint.resume is set but {cfg.checkpoint.dir} holds no usable checkpoint: starting at step 0")
        return Position()
    pos = restore(ckpt, model, embeddings, optimizers, ctx, schedule)
    for line in lr_notes(ckpt.common.get("config", {}), cfg.optimizer):
        note(line)
    return pos


def run(cfg: Config, ctx: DistContext) -> dict:
    if cfg.checkpoint.dir:  # an unusable folder fails now, not at the first save after hours of training
        agreed(ctx, check_writable, cfg.checkpoint.dir)
    locks = lock_run_dirs([cfg.logging.dir, cfg.checkpoint.dir], ctx)
    try:
        return _run(cfg, ctx)
    finally:
        release(locks)


def _run(cfg: Config, ctx: DistContext) -> dict:
    manifest = read_manifest(cfg.data.path)
    check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    specs = table_specs(cfg, manifest.get("cardinalities"))
    check_cardinalities(cfg, manifest, specs)
    tables = [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in specs]
    plan = load_plan(cfg.plan.file, tables, ctx.world_size) if cfg.plan.file else \
        simple_plan(tables, ctx.world_size, cfg.plan.default, cfg.plan.overrides(), ranks_per_node(cfg, ctx))
    torch.manual_seed(cfg.train.seed)
    timer = PhaseTimer() if cfg.train.profile_steps else None
    embeddings = ShardedEmbeddingCollection(tables, plan, rank=ctx.rank, group=ctx.group, seed=cfg.train.seed,
                                            device=ctx.device, optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel,
                                            timer=timer)
    model = DLRM.from_config(cfg, embeddings).to(ctx.device)
    ddp, optimizers = wrap_dense(model, make_optimizers(cfg.optimizer, model), ctx, timer)
    train_loader = make_loader(cfg, manifest, cfg.data.train_split, ctx, train=True)
    eval_loader = make_loader(cfg, manifest, cfg.data.eval_split, ctx, train=False)
    notes: list[str] = []  # said once the log exists
    schedule = Schedule(cfg.optimizer)
    pos = resume(cfg, ctx, model, embeddings, optimizers, notes.append, schedule)
    total = train_loader.num_batches() * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    log = MetricsLog(cfg.logging.dir, ctx.is_main, total, cfg.train.progress_bar, first_step=pos.step,
                     append=pos.step > 0)
    if ctx.is_main:
        for note in notes + ([f"an earlier run's metrics.jsonl is kept as {log.kept}"] if log.kept else []):
            log.info(note)
        write_resolved_config(cfg.logging.dir, dump_toml(cfg))
        log.info(f"plan on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device}:\n"
                 + describe_plan(plan, tables))
        log.info(f"embedding kernel: {embeddings.kernel} ({embeddings.kernel_reason})")
        log.info("pipeline: " + ("on: batch i+1's ids are exchanged while batch i trains (input_wait_ms in "
                                 "metrics.jsonl shows how much of it was not hidden)" if cfg.train.pipeline else "off"))
        if pos.step:
            log.info(f"resumed from {cfg.checkpoint.dir} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    result = train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer,
                        schedule=schedule)
    report_plan_check(cfg, ctx, plan, specs, model.embeddings, result, log)
    if timer is not None:
        report_breakdown(cfg, ctx, timer, log)
    result["bayes_auc"] = manifest.get("bayes_auc")
    log.close()
    return result


def summary_line(result: dict) -> str:
    line = (f"final: step {result['step']} | auc {result['auc']:.4f} | logloss {result['logloss']:.4f} | "
            f"{result['samples_per_s']:,.0f} samples/s")
    if result.get("bayes_auc") is not None:
        line += f" | bayes auc {result['bayes_auc']:.4f} (gap {result['bayes_auc'] - result['auc']:.4f})"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distrec.train", description=__doc__.split("\n")[0],
                                     epilog="Further arguments override the config: --section.key=value")
    parser.add_argument("--config", help="a TOML file under configs/; defaults apply without one")
    parser.add_argument("--plan", metavar="PLAN.json", help="a plan from `distrec plan --json` (= --plan.file=)")
    args, overrides = parser.parse_known_args(argv)
    overrides += [f"--plan.file={args.plan}"] if args.plan else []
    ctx = None
    try:
        cfg = load_config(args.config, overrides)
        ctx = init_distributed(cfg.train.device, cfg.dense.engine)
        result = run(cfg, ctx)
        if ctx.is_main:
            print(summary_line(result), flush=True)
        return 0
    except (ConfigError, DataError, PlanError, InputError, CheckpointError, RunLockError) as e:
        rank = f"[rank {ctx.rank}] " if ctx and ctx.world_size > 1 else ""
        print(f"distrec.train: error: {rank}{e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if ctx is not None:
            shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
