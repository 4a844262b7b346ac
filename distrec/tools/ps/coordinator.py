"""The coordinator's side: metrics from the workers' reports, evaluation on the servers' current
parameters, checkpoints, and the watch on every other process.

    reporter = Reporter(MetricsLog("runs/ps/logs", True, 100, False), log_every=10)
    reporter.add(worker=0, rows=4096, loss_sum=1700.0, staleness=1)   # a worker calls this over RPC
    result = evaluate(cfg, specs, client)        # {"auc", "logloss", "rows"}
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed.rpc as rpc

from distrec.config import Config, TableSpec
from distrec.tools.ps.rows import batch_ids
from distrec.tools.ps.server import dense_model
from distrec.tools.ps.worker import ServerClient, make_worker_loader
from distrec.trainer.logs import MetricsLog
from distrec.trainer.metrics import auc, logloss


class Reporter:
    """Sums the workers' step reports into train records: one per ``log_every`` worker steps."""

    def __init__(self, log: MetricsLog, log_every: int, first_step: int = 0):
        self.log, self.log_every, self.lock = log, max(log_every, 1), threading.Lock()
        self.steps, self.samples, self.all_staleness = first_step, 0, []
        self.loss_sum, self.rows, self.staleness, self.start = 0.0, 0, [], time.perf_counter()
        self.train_start = self.start

    def add(self, worker: int, rows: int, loss_sum: float, staleness: int) -> None:
        with self.lock:
            self.steps, self.samples = self.steps + 1, self.samples + rows
            self.loss_sum, self.rows = self.loss_sum + loss_sum, self.rows + rows
            self.staleness.append(staleness)
            self.all_staleness.append(staleness)
            self.log.step()
            if self.steps % self.log_every == 0:
                self._flush()

    def flush(self) -> None:
        with self.lock:
            if self.rows:
                self._flush()

    def _flush(self) -> None:
        now = time.perf_counter()
        stale = np.asarray(self.staleness, dtype=np.float64)
        self.log._write({"kind": "train", "step": self.steps, "samples": self.samples,
                         "loss": self.loss_sum / max(self.rows, 1), "samples_per_s": self.rows / (now - self.start),
                         "staleness_mean": float(stale.mean()), "staleness_p99": float(np.percentile(stale, 99))})
        self.loss_sum, self.rows, self.staleness, self.start = 0.0, 0, [], now

    def totals(self) -> dict:
        """Samples/s over the whole training time and the staleness over every step."""
        stale = np.asarray(self.all_staleness or [0], dtype=np.float64)
        return {"samples_per_s": self.samples / (time.perf_counter() - self.train_start), "samples": self.samples,
                "staleness_mean": float(stale.mean()), "staleness_p99": float(np.percentile(stale, 99))}


@torch.no_grad()
def evaluate(cfg: Config, specs: list[TableSpec], client: ServerClient) -> dict:
    """Exact AUC and logloss over the eval split, with rows and dense parameters pulled per batch."""
    model = dense_model(cfg, specs).eval()
    probs, labels = [], []
    for batch in make_worker_loader(cfg, 0, cfg.data.eval_split, train=False).epoch(0):
        unique = batch_ids(batch.sparse, len(specs))
        rows, _, dense = client.pull(unique)
        model.load_state_dict(dense)
        model.embeddings.set_rows(unique, rows)
        probs.append(torch.sigmoid(model(batch.dense, batch.sparse)))
        labels.append(batch.labels)
    p, y = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return {"auc": auc(p, y), "logloss": logloss(p, y), "rows": int(y.size)}


_FAILING = threading.Lock()  # the watchdog and the main thread may both see a death: one of them says it


def fail(message: str, procs: dict) -> None:
    """Print one error line, kill the local processes and exit non-zero at once: a clean RPC shutdown
    would wait for the process that is gone."""
    if not _FAILING.acquire(blocking=False):
        time.sleep(60)  # the other thread is saying it and ends the process
    print(f"distrec ps: error: {message}; stopping", file=sys.stderr, flush=True)
    for proc in procs.values():
        if proc is not None and proc.exitcode is None:
            proc.kill()
    os._exit(1)


def fail_process(name: str, detail: str, procs: dict) -> None:
    """``fail`` for process ``name`` after an RPC to it broke: if it is a local process that has exited
    (the broken connection usually arrives first, so wait a moment), say that it died and how."""
    proc = procs.get(name)
    deadline = time.monotonic() + 2.0
    while proc is not None and proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc is not None and proc.exitcode is not None:
        fail(f"{label(name)} (pid {proc.pid}) died (exit code {proc.exitcode})", procs)
    fail(f"{label(name)} {detail}", procs)


class Watchdog(threading.Thread):
    """Polls the local processes' exit codes (a death is seen within a second) and pings every process
    over RPC (a remote one that is gone or silent is seen within ``timeout_s``)."""

    def __init__(self, procs: dict, timeout_s: float):
        super().__init__(daemon=True, name="ps-watchdog")
        self.procs, self.timeout_s, self.done = procs, timeout_s, threading.Event()
        self.pids = {name: p.pid for name, p in procs.items() if p is not None}

    def run(self) -> None:
        last_ping = 0.0
        while not self.done.wait(0.5):
            for name, proc in self.procs.items():
                if proc is not None and proc.exitcode is not None:
                    fail(f"{label(name)} (pid {proc.pid}) died (exit code {proc.exitcode})", self.procs)
            if time.monotonic() - last_ping > min(5.0, self.timeout_s / 4):
                self.ping()
                last_ping = time.monotonic()

    def ping(self) -> None:
        futures = {name: rpc.rpc_async(name, os.getpid, timeout=self.timeout_s) for name in self.procs}
        for name, fut in futures.items():
            try:
                self.pids[name] = fut.wait()
            except Exception as e:  # noqa: BLE001 - any RPC failure means the process is gone
                if self.done.is_set():
                    return
                pid = self.pids.get(name, "unknown")
                fail_process(name, f"(pid {pid}) is unreachable: {str(e).splitlines()[0]}", self.procs)


def label(name: str) -> str:
    """``worker1`` -> ``worker 1``."""
    role = name.rstrip("0123456789")
    return f"{role} {name[len(role):]}"
