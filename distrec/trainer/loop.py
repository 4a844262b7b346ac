"""The training loop: epochs of steps, with logging, periodic evaluation and checkpoints.

    result = train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer, best,
                        Schedule(cfg.optimizer))

``best`` (distrec.trainer.best.BestModel, or None): each evaluation is also saved and tracked, and an
early stop ends the loop after the evaluation that decides it. ``schedule`` sets each step's learning
rates and hears each periodic evaluation (the plateau schedule).
"""
from __future__ import annotations

import time

from distrec.config import Config, to_dict
from distrec.data.loader import ParquetLoader
from distrec.trainer.checkpoint import save_sharded
from distrec.trainer.dist import DistContext, all_gather_object
from distrec.trainer.evaluate import evaluate
from distrec.trainer.logs import MetricsLog
from distrec.trainer.phases import PhaseTimer, TimedOptimizer
from distrec.trainer.pipeline import pipelined, pipelining
from distrec.trainer.schedule import Schedule
from distrec.trainer.state import Position, training_state
from distrec.trainer.step import train_step
from distrec.trainer.window import Window


def samples_seen(pos: Position, loader: ParquetLoader) -> int:
    return pos.epoch * loader.num_rows + min(pos.batch * loader.global_batch_size, loader.num_rows)


def train_loop(cfg, ctx, ddp, model, optimizers, train_loader, eval_loader, pos, total, log, timer=None,
               best=None, schedule=None, scaler=None) -> dict:
    window, G, since_log = Window(), train_loader.global_batch_size, 0
    stopped = lambda: best is not None and best.stopped  # noqa: E731
    schedule = schedule or Schedule(cfg.optimizer)
    step_opts = [TimedOptimizer(o, timer) for o in optimizers] if timer is not None else optimizers
    pipeline = pipelining(cfg, ctx.world_size)
    while pos.step < total and not stopped():
        batches = (b.to(ctx.device) for b in train_loader.epoch(pos.epoch, pos.batch))
        if pipeline:
            batches = pipelined(batches, model.embeddings)
        for batch in (timer.timed_iter(batches) if timer is not None else batches):
            global_size = min(G, train_loader.num_rows - pos.batch * G)
            set_lr(schedule, pos.step, optimizers, log)
            started = time.perf_counter()
            model.embeddings.set_salt(pos.step)  # half tables round by the step: reproducible, resumable
            skipped = scaler.skipped if scaler is not None else 0
            window.loss_sum += train_step(ddp, model.embeddings, step_opts, batch, global_size, scaler)
            if scaler is not None and scaler.skipped > skipped:
                log.skipped_step(pos.step, scaler.scale, scaler.skipped)
            if timer is not None:
                timer.end_step(time.perf_counter() - started)
            window.rows += len(batch)
            window.wait_s += batch.input_wait_s
            pos.step, pos.batch, since_log = pos.step + 1, pos.batch + 1, since_log + 1
            log.step()
            last = pos.step >= total
            if pos.step % cfg.train.log_every_steps == 0 or last:
                log.train_window(pos.step, samples_seen(pos, train_loader), *window.close(ctx, since_log),
                                 pipelined=pipeline)
                since_log = 0
            with window.paused():
                evaluated = bool(cfg.eval.every_steps and pos.step % cfg.eval.every_steps == 0 and not last)
                if evaluated:
                    result = evaluation(cfg, ctx, model, optimizers, eval_loader, pos, log, best, schedule,
                                        scaler=scaler)
                if cfg.checkpoint.dir and cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0 \
                        and not last and not (evaluated and best):  # with best on, the evaluation saved it
                    checkpoint(cfg, ctx, model, optimizers, pos, schedule, scaler)
            if last or stopped():
                break
        if pos.batch >= train_loader.num_batches():
            pos.epoch, pos.batch = pos.epoch + 1, 0
    if stopped() and since_log:  # the steps since the last train record, as `last` would have logged them
        log.train_window(pos.step, samples_seen(pos, train_loader), *window.close(ctx, since_log),
                         pipelined=pipeline)
    if not stopped():  # an early stop has just evaluated and saved this model
        result = evaluation(cfg, ctx, model, optimizers, eval_loader, pos, log, best, schedule, final=True,
                            scaler=scaler)
    return {**result, "step": pos.step,
            "samples_per_s": window.trained / window.train_time if window.train_time else 0.0}


def evaluation(cfg: Config, ctx: DistContext, model, optimizers, eval_loader, pos: Position, log, best, schedule,
               final: bool = False, scaler=None) -> dict:
    """Evaluate and log; with ``best``, save and track it too; the final one is saved in any case."""
    result = evaluate(model, eval_loader, ctx)
    log.evaluation(pos.step, **result)
    # Heard before the save, so that a resume from it has heard it too (plateau); a run's last evaluation
    # at a periodic step counts as that periodic one, so stopping there and resuming changes nothing.
    if not final or (cfg.eval.every_steps and pos.step % cfg.eval.every_steps == 0):
        schedule.evaluated(result)
    save = lambda: checkpoint(cfg, ctx, model, optimizers, pos, schedule, scaler)  # noqa: E731
    if best is not None:
        best.after_evaluation(pos, result, save, log, final)
    elif final and cfg.checkpoint.dir:
        save()
    return result


def set_lr(schedule: Schedule, step: int, optimizers, log: MetricsLog) -> None:
    """This step's learning rates; each change is a {"kind": "lr"} record (every step while warming up)."""
    changed = schedule.apply(step, optimizers)
    if changed is not None:
        log.record({"kind": "lr", "step": step, "dense_lr": changed[0], "sparse_lr": changed[1]})


def checkpoint(cfg: Config, ctx: DistContext, model, optimizers, pos: Position, schedule=None, scaler=None) -> None:
    common, own = training_state(model, model.embeddings, optimizers, pos, ctx, to_dict(cfg), schedule, scaler)
    save_sharded(cfg.checkpoint.dir, pos.step, common, own, ctx, keep=cfg.checkpoint.keep)


def report_breakdown(cfg: Config, ctx: DistContext, timer: PhaseTimer, log: MetricsLog) -> None:
    """Collective: each rank's mean ms per phase and per exchange's overlap (in flight, waited, hidden);
    rank 0 writes {"kind": "breakdown"} with the means over ranks and every rank's own numbers."""
    per_rank = all_gather_object(timer.summary(cfg.train.profile_steps), ctx)
    if ctx.is_main:
        mean = lambda values: sum(values) / len(per_rank)  # noqa: E731
        ms = {k: mean(r["ms"][k] for r in per_rank) for k in per_rank[0]["ms"]}
        overlap = {name: {k: mean(r["overlap_ms"][name][k] for r in per_rank) for k in fields}
                   for name, fields in per_rank[0]["overlap_ms"].items()}
        log.record({"kind": "breakdown", "steps": per_rank[0]["steps"], "ms": ms, "overlap_ms": overlap,
                    "ranks": [r["ms"] for r in per_rank], "ranks_overlap_ms": [r["overlap_ms"] for r in per_rank]})
