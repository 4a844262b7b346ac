"""Train a DLRM: config -> distributed init -> plan -> model -> loop.

    torchrun --standalone --nproc_per_node 2 -m distrec.train --config configs/demo.toml --train.epochs=2
    python -m distrec.train --config configs/demo.toml          # one process, no process group
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from distrec.checkpoint import open_latest, save_sharded
from distrec.config import Config, ConfigError, dump_toml, load_config, table_specs, to_dict
from distrec.data.loader import ParquetLoader, make_loader
from distrec.data.manifest import DataError, check_schema, read_manifest
from distrec.dense_parallel import wrap_dense
from distrec.dist import DistContext, all_gather_object, all_reduce_sum, init_distributed, shutdown
from distrec.logs import MetricsLog, write_resolved_config
from distrec.loop import Position, evaluate, pipelined, restore, train_step, training_state
from distrec.model.dlrm import DLRM
from distrec.phases import PhaseTimer, TimedOptimizer
from distrec.optim import make_optimizers, sparse_spec
from distrec.plan_check import report_plan_check
from sharding.plan import describe_plan, load_plan, simple_plan
from sharding.runtime import InputError, ShardedEmbeddingCollection
from sharding.types import PlanError, TableConfig


def check_cardinalities(cfg: Config, manifest: dict, specs) -> None:
    """Tables smaller than the data's id range would fail deep inside the lookup: say so up front."""
    for spec in specs:
        have = manifest.get("cardinalities", {}).get(spec.name, 0)
        if have > spec.num_rows:
            raise ConfigError(f"{cfg.source}: table {spec.name} has {spec.num_rows} rows but the data in "
                              f"{cfg.data.path} has ids up to {have - 1}; raise tables.cardinalities")


def run(cfg: Config, ctx: DistContext) -> dict:
    manifest = read_manifest(cfg.data.path)
    check_schema(manifest, cfg.schema.label, cfg.schema.dense, cfg.schema.categorical, cfg.source)
    specs = table_specs(cfg, manifest.get("cardinalities"))
    check_cardinalities(cfg, manifest, specs)
    tables = [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in specs]
    plan = load_plan(cfg.plan.file, tables, ctx.world_size) if cfg.plan.file else \
        simple_plan(tables, ctx.world_size, cfg.plan.default, cfg.plan.overrides())
    torch.manual_seed(cfg.train.seed)
    timer = PhaseTimer() if cfg.train.profile_steps else None
    embeddings = ShardedEmbeddingCollection(tables, plan, rank=ctx.rank, group=ctx.group, seed=cfg.train.seed,
                                            device=ctx.device, optim=sparse_spec(cfg.optimizer), kernel=cfg.plan.kernel,
                                            timer=timer)
    model = DLRM.from_config(cfg, embeddings).to(ctx.device)
    ddp, optimizers = wrap_dense(model, make_optimizers(cfg.optimizer, model), ctx, timer)
    train_loader = make_loader(cfg, manifest, cfg.data.train_split, ctx, train=True)
    eval_loader = make_loader(cfg, manifest, cfg.data.eval_split, ctx, train=False)
    pos = Position()
    if cfg.checkpoint.resume and cfg.checkpoint.dir and (ckpt := open_latest(cfg.checkpoint.dir)):
        pos = restore(ckpt, model, embeddings, optimizers, ctx)
    total = train_loader.num_batches() * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    log = MetricsLog(cfg.logging.dir, ctx.is_main, total, cfg.train.progress_bar, first_step=pos.step)
    if ctx.is_main:
        write_resolved_config(cfg.logging.dir, dump_toml(cfg))
        log.info(f"plan on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device}:\n"
                 + describe_plan(plan, tables))
        log.info(f"embedding kernel: {embeddings.kernel} ({embeddings.kernel_reason})")
        log.info("pipeline: " + ("on: batch i+1's ids are exchanged while batch i trains (input_wait_ms in "
                                 "metrics.jsonl shows how much of it was not hidden)" if cfg.train.pipeline else "off"))
        if pos.step:
            log.info(f"resumed from {cfg.checkpoint.dir} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    result = train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer)
    report_plan_check(cfg, ctx, plan, specs, model.embeddings, result, log)
    if timer is not None:
        report_breakdown(cfg, ctx, timer, log)
    result["bayes_auc"] = manifest.get("bayes_auc")
    log.close()
    return result


class Window:
    """Loss and samples/s over a logging window; time spent evaluating or checkpointing is left out."""

    def __init__(self):
        self.loss_sum = self.rows = self.wait_s = 0.0  # this rank's; wait_s: pipelined input dist waits
        self.start = time.perf_counter()
        self.train_time, self.trained = 0.0, 0  # totals over the run, all ranks

    def close(self, ctx: DistContext, steps: int) -> tuple[float, float, float]:
        """(global mean loss, global samples/s, mean ms per step this rank waited for its ids)."""
        loss_sum, rows = all_reduce_sum([self.loss_sum, self.rows], ctx)
        elapsed = time.perf_counter() - self.start
        self.train_time, self.trained = self.train_time + elapsed, self.trained + int(rows)
        wait_ms = 1e3 * self.wait_s / max(steps, 1)
        self.loss_sum = self.rows = self.wait_s = 0.0
        self.start = time.perf_counter()
        return loss_sum / max(rows, 1.0), rows / elapsed, wait_ms

    @contextlib.contextmanager
    def paused(self):
        begin = time.perf_counter()
        yield
        self.start += time.perf_counter() - begin


def report_breakdown(cfg: Config, ctx: DistContext, timer: PhaseTimer, log: MetricsLog) -> None:
    """Collective: each rank's mean ms per phase; rank 0 writes {"kind": "breakdown"} with the mean over
    ranks and every rank's own numbers."""
    per_rank = all_gather_object(timer.summary(cfg.train.profile_steps), ctx)
    if ctx.is_main:
        phases = per_rank[0]["ms"].keys()
        mean = {k: sum(r["ms"][k] for r in per_rank) / len(per_rank) for k in phases}
        log.record({"kind": "breakdown", "steps": per_rank[0]["steps"], "ms": mean,
                    "ranks": [r["ms"] for r in per_rank]})


def samples_seen(pos: Position, loader: ParquetLoader) -> int:
    return pos.epoch * loader.num_rows + min(pos.batch * loader.global_batch_size, loader.num_rows)


def train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer=None) -> dict:
    window, G, since_log = Window(), train_loader.global_batch_size, 0
    step_opts = [TimedOptimizer(o, timer) for o in optimizers] if timer is not None else optimizers
    while pos.step < total:
        batches = (b.to(ctx.device) for b in train_loader.epoch(pos.epoch, pos.batch))
        if cfg.train.pipeline:
            batches = pipelined(batches, model.embeddings)
        for batch in (timer.timed_iter(batches) if timer is not None else batches):
            global_size = min(G, train_loader.num_rows - pos.batch * G)
            started = time.perf_counter()
            window.loss_sum += train_step(ddp, model.embeddings, step_opts, batch, global_size)
            if timer is not None:
                timer.end_step(time.perf_counter() - started)
            window.rows += len(batch)
            window.wait_s += batch.input_wait_s
            pos.step, pos.batch, since_log = pos.step + 1, pos.batch + 1, since_log + 1
            log.step()
            last = pos.step >= total
            if pos.step % cfg.train.log_every_steps == 0 or last:
                log.train_window(pos.step, samples_seen(pos, train_loader), *window.close(ctx, since_log),
                                 pipelined=cfg.train.pipeline)
                since_log = 0
            with window.paused():
                if cfg.eval.every_steps and pos.step % cfg.eval.every_steps == 0 and not last:
                    log.evaluation(pos.step, **evaluate(model, eval_loader, ctx))
                if cfg.checkpoint.dir and cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0 \
                        and not last:
                    checkpoint(cfg, ctx, model, optimizers, pos)
            if last:
                break
        if pos.batch >= train_loader.num_batches():
            pos.epoch, pos.batch = pos.epoch + 1, 0
    result = evaluate(model, eval_loader, ctx)
    log.evaluation(pos.step, **result)
    if cfg.checkpoint.dir:
        checkpoint(cfg, ctx, model, optimizers, pos)
    return {**result, "step": pos.step,
            "samples_per_s": window.trained / window.train_time if window.train_time else 0.0}


def checkpoint(cfg: Config, ctx: DistContext, model, optimizers, pos: Position) -> None:
    common, own = training_state(model, model.embeddings, optimizers, pos, ctx, to_dict(cfg))
    save_sharded(cfg.checkpoint.dir, pos.step, common, own, ctx, keep=cfg.checkpoint.keep)


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
    except (ConfigError, DataError, PlanError, InputError) as e:
        rank = f"[rank {ctx.rank}] " if ctx and ctx.world_size > 1 else ""
        print(f"distrec.train: error: {rank}{e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if ctx is not None:
            shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
