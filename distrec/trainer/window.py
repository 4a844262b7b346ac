"""The metrics window: loss and samples/s over the steps between two log lines.

    window = Window(); window.loss_sum += loss; window.rows += len(batch)
    loss, samples_per_s, wait_ms = window.close(ctx, steps)      # global over ranks; resets the window
"""
from __future__ import annotations

import contextlib
import time

from distrec.trainer.dist import DistContext, all_reduce_sum


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
