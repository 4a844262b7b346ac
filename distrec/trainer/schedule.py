"""Learning-rate schedules (``optimizer.schedule``) for the dense and the sparse learning rate.

    sched = Schedule(cfg.optimizer)
    sched.apply(pos.step, optimizers)     # before each step: lr = configured lr * factor
    sched.evaluated({"auc": 0.79, ...})   # after each periodic evaluation (plateau only)

``step`` is the number of steps already taken, so the update that takes training from step s to s + 1
uses ``lr * lr_factor(s, cfg)``:

- ``constant``:    1
- ``warmup``:      min(1, (s + 1) / warmup_steps)
- ``step``:        decay_rate ** (s // decay_steps)
- ``exponential``: decay_rate ** (s / decay_steps)
- ``mlperf``:      (s + 1) / warmup_steps while s < warmup_steps, 1 until decay_start_step, then
                   ((decay_steps - (s - decay_start_step)) / decay_steps) ** 2 (MLPerf DLRM's polynomial
                   decay, power 2) over decay_steps steps, 0 after
- ``plateau``:     decay_rate ** (reductions so far); a reduction happens at the evaluation that is the
                   plateau_patience-th in a row without a strict improvement of plateau_metric (auc:
                   higher, logloss: lower) over the best so far; the count then starts again.

The step-based factors follow from the step alone, so a resumed run continues them; plateau's
(best, evaluations without improvement, reductions) is saved in checkpoints (``state_dict``).
"""
from __future__ import annotations

from distrec.config import OptimizerConfig
from distrec.trainer.metrics import Tracker


def lr_factor(step: int, cfg: OptimizerConfig, reductions: int = 0) -> float:
    """The multiplier of the configured lr for the update after ``step`` steps:
    ``lr_factor(99, OptimizerConfig(schedule="warmup", warmup_steps=100)) == 1.0``."""
    kind = cfg.schedule
    if kind == "constant":
        return 1.0
    if kind == "warmup":
        return min(1.0, (step + 1) / cfg.warmup_steps)
    if kind == "step":
        return cfg.decay_rate ** (step // cfg.decay_steps)
    if kind == "exponential":
        return cfg.decay_rate ** (step / cfg.decay_steps)
    if kind == "plateau":
        return cfg.decay_rate ** reductions
    return _mlperf(step, cfg)


def _mlperf(step: int, cfg: OptimizerConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decayed = step - cfg.decay_start_step
    if decayed < 0:
        return 1.0
    return max(0.0, (cfg.decay_steps - decayed) / cfg.decay_steps) ** 2


class Plateau:
    """Reduce-on-plateau's memory: ``Plateau("auc", patience=2).evaluated(0.71)`` -> True when it reduces."""

    def __init__(self, metric: str, patience: int):
        self.tracker, self.patience, self.reductions = Tracker(metric), patience, 0

    @property
    def best(self) -> float | None:
        return self.tracker.best

    def evaluated(self, value: float) -> bool:
        if self.tracker.update(0, value) or self.tracker.since < self.patience:
            return False
        self.tracker.since, self.reductions = 0, self.reductions + 1  # the count starts again
        return True

    def state_dict(self) -> dict:  # plain data: weights_only
        return {"best": self.tracker.best, "bad": self.tracker.since, "reductions": self.reductions}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.best, self.tracker.since, self.reductions = state["best"], state["bad"], state["reductions"]


class Schedule:
    """Sets the dense optimizer's and the embedding optimizer's lr each step from the config."""

    def __init__(self, cfg: OptimizerConfig):
        self.cfg = cfg
        self.plateau = Plateau(cfg.plateau_metric, cfg.plateau_patience)
        self.applied: tuple[float, float] | None = None  # the (dense, sparse) lr last set

    def lrs(self, step: int) -> tuple[float, float]:
        """(dense lr, sparse lr) for the update after ``step`` steps."""
        factor = lr_factor(step, self.cfg, self.plateau.reductions)
        sparse = self.cfg.sparse_lr * factor if self.cfg.schedule_sparse else self.cfg.sparse_lr
        return self.cfg.dense_lr * factor, sparse

    def apply(self, step: int, optimizers: list) -> tuple[float, float] | None:
        """Set ``optimizers`` = [dense torch optimizer, EmbeddingOptimizer] to this step's lrs; returns them
        when they changed (None when not), so only changes cost anything or get logged."""
        lrs = self.lrs(step)
        if lrs == self.applied:
            return None
        dense, sparse = optimizers
        for group in dense.param_groups:
            group["lr"] = lrs[0]
        sparse.set_lr(lrs[1])
        self.applied = lrs
        return lrs

    def evaluated(self, metrics: dict) -> bool:
        """After a periodic evaluation: True when plateau reduced the lr (the next ``apply`` sets it)."""
        return self.cfg.schedule == "plateau" and self.plateau.evaluated(metrics[self.cfg.plateau_metric])

    def state_dict(self) -> dict:
        return {"plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plateau.load_state_dict(state["plateau"])


def lr_notes(saved_config: dict, cfg: OptimizerConfig) -> list[str]:
    """What a resume changes: ``["dense_lr 0.002 from the config replaces 0.001 from the checkpoint"]``."""
    saved = saved_config.get("optimizer", {})
    return [f"{key} {getattr(cfg, key):g} from the config replaces {saved[key]:g} from the checkpoint"
            for key in ("dense_lr", "sparse_lr") if key in saved and saved[key] != getattr(cfg, key)]
