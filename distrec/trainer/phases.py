"""Opt-in per-phase wall time of training steps (``--train.profile_steps=N``), for the step-time
breakdown of ``distrec bench``.

    timer = PhaseTimer()
    with timer.phase("lookup"):
        pooled = lookup(...)
    timer.exchange("output_a2a", in_flight_s, waited_s)   # an exchange overlapped with other work
    timer.end_step(step_seconds)          # closes the step: its phases become one row
    timer.summary(last=20)                # {"steps": 20, "ms": {"lookup": 1.2, ..., "dense_fwd_bwd": ...},
                                          #  "overlap_ms": {"output_a2a": {"in_flight": 3.1, "waited": 0.4,
                                          #                                "hidden": 2.7}, ...}}

Nothing calls it unless the trainer passes one to the embeddings (off by default), so the hot path pays
one ``is None`` test per phase.
"""
from __future__ import annotations

import contextlib
import time

# Phases measured directly; "dense_fwd_bwd" is the rest of the step (see ``end_step``). The all-to-alls'
# phases are their exposed time: starting them and waiting for them (grad_a2a: the embeddings' gradients).
PHASES = ("data_wait", "input_a2a", "lookup", "output_a2a", "grad_a2a", "grad_allreduce", "optimizer")
# The exchanges that run beside other work: ids, pooled vectors, their gradients.
EXCHANGES = ("input_a2a", "output_a2a", "grad_a2a")


class PhaseTimer:
    def __init__(self):
        self.current: dict[str, float] = {}
        self.flights: dict[str, list[float]] = {}  # this step's exchanges: name -> [in flight s, waited s]
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def exchange(self, name: str, in_flight_s: float, waited_s: float) -> None:
        """An exchange of this step arrived: it was in flight ``in_flight_s`` (start to end of wait), of
        which the wait blocked ``waited_s``; the rest was hidden behind other work."""
        flight = self.flights.setdefault(name, [0.0, 0.0])
        flight[0] += in_flight_s
        flight[1] += waited_s

    def end_step(self, step_seconds: float) -> None:
        """Close a step that took ``step_seconds`` (data wait excluded). The gradient all-reduce runs
        on gloo's thread while backward goes on, so it is not subtracted: dense_fwd_bwd is the step
        minus the input/output all-to-all, lookup, optimizer and the data-parallel tables' all-reduce
        (it holds the embeddings' backward too: reverse all-to-all and fused row update)."""
        row = {p: self.current.get(p, 0.0) for p in PHASES}
        replicas = self.current.get("replica_allreduce", 0.0)  # data-parallel tables: after backward, blocking
        row["grad_allreduce"] += replicas
        exclusive = sum(row[p] for p in ("input_a2a", "lookup", "output_a2a", "grad_a2a", "optimizer")) + replicas
        row["dense_fwd_bwd"] = max(step_seconds - exclusive, 0.0)
        row["step"] = step_seconds + row["data_wait"]
        row["flights"] = {name: self.flights.get(name, [0.0, 0.0]) for name in EXCHANGES}
        self.rows.append(row)
        self.current, self.flights = {}, {}

    def summary(self, last: int) -> dict:
        """Mean milliseconds per phase over the last ``last`` steps (the first step, warm-up, left out
        when there are others)."""
        rows = self.rows[1:] if len(self.rows) > 1 else self.rows
        rows = rows[-last:] if last else rows
        keys = [*PHASES, "dense_fwd_bwd", "step"]
        mean = lambda values: 1e3 * sum(values) / max(len(rows), 1)  # noqa: E731
        return {"steps": len(rows), "ms": {k: mean(r[k] for r in rows) for k in keys},
                "overlap_ms": {name: overlap(mean(r["flights"][name][0] for r in rows),
                                             mean(r["flights"][name][1] for r in rows)) for name in EXCHANGES}}

    def timed_iter(self, items, name: str = "data_wait"):
        """``items`` with the time spent waiting for each next item added to phase ``name``."""
        it = iter(items)
        while True:
            with self.phase(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item


def overlap(in_flight_ms: float, waited_ms: float) -> dict[str, float]:
    """One exchange's overlap: time in flight, time waited (exposed), hidden = in flight - waited."""
    return {"in_flight": in_flight_ms, "waited": waited_ms, "hidden": max(in_flight_ms - waited_ms, 0.0)}


class TimedOptimizer:
    """An optimizer whose ``step`` counts as the "optimizer" phase; everything else passes through."""

    def __init__(self, opt, timer: PhaseTimer):
        self.opt, self.timer = opt, timer

    def step(self):
        with self.timer.phase("optimizer"):
            return self.opt.step()

    def zero_grad(self, *args, **kwargs):
        return self.opt.zero_grad(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.opt, name)
