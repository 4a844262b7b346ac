"""Train a DLRM: config -> distributed init -> plan -> model -> loop.

    torchrun --standalone --nproc_per_node 2 -m distrec.train --config configs/demo.toml --train.epochs=2
    python -m distrec.train --config configs/demo.toml          # one process, no process group
"""
from __future__ import annotations

import argparse
import sys


from distrec import print_error
from distrec.config import Config, ConfigError, dump_toml, load_config
from distrec.data.loader import make_loader
from distrec.data.manifest import DataError, read_manifest
from distrec.trainer.best import BestModel, report_test
from distrec.trainer.build import build_model, comm_precision
from distrec.trainer.checkpoint import CheckpointError, agreed, check_writable, open_for_resume
from distrec.trainer.dense_parallel import wrap_dense
from distrec.trainer.dist import DistContext, init_distributed, shutdown
from distrec.trainer.locks import RunLockError, lock_run_dirs, release
from distrec.trainer.logs import MetricsLog, write_plan, write_resolved_config
from distrec.trainer.loop import report_breakdown, train_loop
from distrec.trainer.phases import PhaseTimer
from distrec.trainer.pipeline import pipelining
from distrec.trainer.plan_check import report_plan_check
from distrec.trainer.loss_scale import LossScale
from distrec.trainer.precision import precision_note, storage_note
from distrec.trainer.schedule import Schedule, lr_notes
from distrec.trainer.state import Position, restore
from sharding.runtime import InputError
from sharding.types import PlanError


def resume(cfg: Config, ctx: DistContext, model, embeddings, optimizers, note, schedule=None,
           scaler=None) -> Position:
    """Where to start: step 0, or the newest checkpoint that verifies when ``checkpoint.resume`` is set
    (each one passed over, and finding none, is told to ``note``)."""
    if not (cfg.checkpoint.resume and cfg.checkpoint.dir):
        return Position()
    ckpt = open_for_resume(cfg.checkpoint.dir, ctx, note)
    if ckpt is None:
        note(f"checkpoint.resume is set but {cfg.checkpoint.dir} holds no usable checkpoint: starting at step 0")
        return Position()
    pos = restore(ckpt, model, embeddings, optimizers, ctx, schedule, scaler)
    for line in lr_notes(ckpt.common.get("config", {}), cfg.optimizer):
        note(line)
    return pos


def check_batch_norm(cfg: Config, loader) -> None:
    """Batch norm needs 2 rows per rank in every training batch; a short last batch split over the ranks
    may leave one, where torch would fail after a whole epoch: say so before training (every rank alike)."""
    if cfg.model.norm != "batch" or not loader.num_batches():
        return
    G, last = loader.global_batch_size, loader.num_batches() - 1
    fewest = min(G, loader.num_rows - last * G) // loader.world_size  # the smallest rank's share
    if fewest < 2:
        raise ConfigError(f"{cfg.source}: model.norm = 'batch' needs 2 rows per rank in every batch, and the last "
                          f"batch of {loader.num_rows - last * G} rows gives a rank {fewest}: set data.drop_last = "
                          "true or change train.global_batch_size")


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
    timer = PhaseTimer() if cfg.train.profile_steps else None
    built = build_model(cfg, ctx, manifest, timer)
    specs, tables, plan, embeddings, model = built.specs, built.tables, built.plan, built.embeddings, built.model
    ddp, optimizers = wrap_dense(model, built.optimizers, ctx, timer, cfg.plan.dense_comm_precision)
    train_loader = make_loader(cfg, manifest, cfg.data.train_split, ctx, train=True)
    check_batch_norm(cfg, train_loader)
    eval_loader = make_loader(cfg, manifest, cfg.data.eval_split, ctx, train=False)
    test_loader = make_loader(cfg, manifest, cfg.data.test_split, ctx, train=False) if cfg.data.test_split else None
    notes: list[str] = []  # said once the log exists
    schedule = Schedule(cfg.optimizer)
    scaler = LossScale(cfg.train.loss_scale) if cfg.train.precision == "fp16" else None
    pos = resume(cfg, ctx, model, embeddings, optimizers, notes.append, schedule, scaler)
    best = BestModel.start(cfg, ctx, pos.step, notes.append)
    total = train_loader.num_batches() * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    log = MetricsLog(cfg.logging.dir, ctx.is_main, total, cfg.train.progress_bar, first_step=pos.step,
                     append=pos.step > 0)
    if ctx.is_main:
        for note in notes + ([f"an earlier run's metrics.jsonl is kept as {log.kept}"] if log.kept else []):
            log.info(note)
        write_resolved_config(cfg.logging.dir, dump_toml(cfg))
        kept = write_plan(cfg.logging.dir, plan, tables)
        log.info(f"plan on {ctx.world_size} rank(s), backend {ctx.backend}, device {ctx.device}, from "
                 f"{built.chosen.source}{f' (kept as {kept})' if kept else ''}:\n{built.chosen.report}")
        log.info(f"embedding kernel: {embeddings.kernel} ({embeddings.kernel_reason})")
        precision, warning = precision_note(cfg.train.precision, ctx.device.type)
        log.info(precision + (f"\nwarning: {warning}" if warning else ""))
        log.info(storage_note({s.name: s.precision for s in specs}, cfg.tables.stochastic_rounding,
                              comm_precision(cfg.plan), cfg.plan.dense_comm_precision))
        log.info("pipeline: " + ("on: batch i+1's ids are exchanged while batch i trains (input_wait_ms in "
                                 "metrics.jsonl shows how much of it was not hidden)" if pipelining(cfg, ctx.world_size)
                                 else "off (one rank: no exchange to hide)" if cfg.train.pipeline else "off"))
        if pos.step:
            log.info(f"resumed from {cfg.checkpoint.dir} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    result = train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer, best,
                        schedule, scaler)
    if best is not None:  # the final evaluation is of the best model, and the test split sees that one
        result = best.final(model, optimizers, eval_loader, ctx, log, result)
    if test_loader is not None:
        which = ("best", result["best_step"]) if best is not None else ("last", pos.step)
        result["test"] = report_test(model, test_loader, ctx, log, which[1], which[0])
    report_plan_check(cfg, ctx, plan, specs, model.embeddings, result, log)
    if timer is not None:
        report_breakdown(cfg, ctx, timer, log)
    result["bayes_auc"] = manifest.get("bayes_auc")
    log.close()
    return result


def summary_line(result: dict) -> str:
    head = f"final (best, step {result['best_step']} of {result['step']}): " if "best_step" in result else \
        f"final: step {result['step']} | "
    line = (f"{head}auc {result['auc']:.4f} | logloss {result['logloss']:.4f} | "
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
        print_error(f"distrec.train: error: {rank}{e}")
        return 2
    finally:
        if ctx is not None:
            shutdown(ctx)


if __name__ == "__main__":
    sys.exit(main())
