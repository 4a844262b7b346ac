"""metrics.jsonl, the resolved config and plan, and rank 0's progress bar.

    log = MetricsLog("runs/demo/logs", is_main=True, total_steps=488, progress=True)
    log.train_window(step=50, samples=204800, loss=0.41, samples_per_s=51000.0, input_wait_ms=0.0)
    log.evaluation(step=488, auc=0.79, logloss=0.35)
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from sharding.plan import save_plan


class MetricsLog:
    """``append``: a resumed run continues the records; otherwise an earlier run's metrics.jsonl is kept
    as metrics.N.jsonl and this run starts a fresh file (``self.kept`` says where the old one went)."""

    def __init__(self, log_dir: str, is_main: bool, total_steps: int, progress: bool, first_step: int = 0,
                 append: bool = False):
        self.is_main, self.kept = is_main, None
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir and is_main else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append and self.path.exists():
                self.kept = _free_name(self.path)
                self.path.rename(self.kept)
        self.bar = tqdm(total=total_steps, initial=first_step, unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=1.0) if is_main and progress else None

    def _write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "time": time.time()}) + "\n")

    def step(self) -> None:
        if self.bar:
            self.bar.update(1)

    def train_window(self, step: int, samples: int, loss: float, samples_per_s: float, input_wait_ms: float,
                     pipelined: bool = False) -> None:
        record = {"kind": "train", "step": step, "samples": samples, "loss": loss, "samples_per_s": samples_per_s}
        self._write({**record, "input_wait_ms": input_wait_ms} if pipelined else record)
        if self.bar:
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{samples_per_s:,.0f}")

    def evaluation(self, step: int, auc: float, logloss: float, rows: int) -> None:
        self._write({"kind": "eval", "step": step, "auc": auc, "logloss": logloss, "rows": rows})
        self.info(f"eval step {step}: auc {auc:.4f} logloss {logloss:.4f} over {rows:,} rows")

    def skipped_step(self, step: int, new_scale: float, skipped: int) -> None:
        """fp16: step ``step``'s gradients overflowed on some rank, so it updated nothing."""
        self._write({"kind": "skip", "step": step, "loss_scale": new_scale, "skipped": skipped})
        self.info(f"step {step}: gradients overflowed in fp16; the step updated nothing and the loss scale is "
                  f"now {new_scale:g} ({skipped} skipped so far)")

    def record(self, record: dict) -> None:
        """Another kind of line for metrics.jsonl (e.g. the plan check)."""
        self._write(record)

    def info(self, text: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar else print)(text)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _free_name(path: Path) -> Path:
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return kept


def write_resolved_config(log_dir: str, toml_text: str) -> None:
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "config.toml").write_text(toml_text)


PLAN_FILE = "plan.json"  # the plan a run ran, in the run's log folder: `--plan` takes it to pin it


def write_plan(log_dir: str, plan, tables) -> str:
    """Keep the run's plan beside its config; returns where (or "" without a log folder)."""
    if not log_dir:
        return ""
    path = Path(log_dir) / PLAN_FILE
    save_plan(path, plan, tables)
    return str(path)
