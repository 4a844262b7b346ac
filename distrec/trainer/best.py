"""Early stopping and the best model: the best-by-metric checkpoint, and the final evaluations of it.

    best = BestModel.start(cfg, ctx, pos, notes.append)     # None unless early_stop or keep_best is on
    best.after_evaluation(pos, result, save, log)           # at each evaluation: save, track, maybe stop
    result = best.final(model, optimizers, eval_loader, ctx, log, result)  # the best step's, evaluated

The rule itself is ``distrec.trainer.metrics.Tracker`` (no I/O): ``Tracker("auc").update(step, value)`` says whether the value
improved, and ``since`` counts the evaluations since the last improvement.
"""
from __future__ import annotations

from pathlib import Path

from distrec.config import Config
from distrec.trainer.checkpoint import agreed, forget_best, open_checkpoint, read_best, write_best
from distrec.trainer.evaluate import evaluate
from distrec.trainer.metrics import Tracker
from distrec.trainer.state import restore

def best_metric(cfg: Config) -> str:
    """The metric that names the best model: checkpoint.keep_best, else train.early_stop.metric ("" off)."""
    return cfg.checkpoint.keep_best or cfg.train.early_stop.metric


class BestModel:
    """Saves a checkpoint at every evaluation, names the best in best.json, decides early stopping."""

    def __init__(self, cfg: Config, tracker: Tracker, is_main: bool):
        self.cfg, self.tracker, self.is_main, self.stopped = cfg, tracker, is_main, False

    @classmethod
    def start(cls, cfg: Config, ctx, step: int, note) -> "BestModel | None":
        """A fresh run forgets an earlier run's best.json; a resumed one continues its record (and its
        patience: the evaluations since the best are counted from eval.every_steps)."""
        metric = best_metric(cfg)
        if not metric:
            return None
        tracker = Tracker(metric)
        saved = agreed(ctx, read_best, cfg.checkpoint.dir)
        if step == 0 or saved is None or saved["step"] > step or saved["metric"] != metric:
            if ctx.is_main:
                forget_best(cfg.checkpoint.dir)
        else:
            every = cfg.eval.every_steps or step
            tracker = Tracker(metric, saved["value"], saved["step"], step // every - saved["step"] // every)
            note(f"best checkpoint so far: step {saved['step']}, {metric} {saved['value']:.4f}")
        return cls(cfg, tracker, ctx.is_main)

    def after_evaluation(self, pos, result: dict, save, log, final: bool = False) -> None:
        """``save()`` the model just evaluated (collective); name it the best if it is; at a periodic
        evaluation, stop once the metric has not improved for train.early_stop.patience evaluations."""
        save()
        value = result[self.tracker.metric]
        if self.tracker.update(pos.step, value) and self.is_main:
            write_best(self.cfg.checkpoint.dir, pos.step, self.tracker.metric, value, self.cfg.checkpoint.keep)
        stop = self.cfg.train.early_stop
        if stop.metric and not final and self.tracker.since >= stop.patience:
            self.stopped = True
            t = self.tracker
            log.record({"kind": "early_stop", "step": pos.step, "metric": t.metric, "patience": stop.patience,
                        "best_step": t.best_step, "best": t.best})
            log.info(f"early stop at step {pos.step}: {t.metric} has not improved for {stop.patience} evaluations "
                     f"(best {t.best:.4f} at step {t.best_step})")

    def final(self, model, optimizers, eval_loader, ctx, log, last: dict) -> dict:
        """The best step's weights loaded (any world size, as a resume) and evaluated. ``last``: the
        loop's result (its evaluation of the model at last["step"], reused when that is the best)."""
        t, metrics = self.tracker, {k: last[k] for k in ("auc", "logloss", "rows")}
        if t.best_step != last["step"]:
            ckpt = agreed(ctx, open_checkpoint, Path(self.cfg.checkpoint.dir) / f"step_{t.best_step}")
            restore(ckpt, model, model.embeddings, optimizers, ctx)
            metrics = evaluate(model, eval_loader, ctx)
        log.record({"kind": "final", "model": "best", "step": t.best_step, "trained_steps": last["step"], **metrics})
        log.info(f"final (best, step {t.best_step}): auc {metrics['auc']:.4f} logloss {metrics['logloss']:.4f} "
                 f"over {metrics['rows']:,} rows")
        return {**last, **metrics, "best_step": t.best_step}


def report_test(model, test_loader, ctx, log, step: int, which: str) -> dict:
    """The test split, once, with the model the run ends on (``which``: "best" or "last", at ``step``)."""
    result = evaluate(model, test_loader, ctx, calibration=True)
    log.record({"kind": "test", "model": which, "step": step, **result})
    log.info(f"test ({which}, step {step}): auc {result['auc']:.4f} logloss {result['logloss']:.4f} "
             f"calibration {result['calibration']:.4f} over {result['rows']:,} rows")
    return result
