"""A PS worker: pull the batch's rows and the dense parameters, step locally, push without waiting.

    client = ServerClient(server_rrefs, specs, Partition("hash", 1), timeout_s=60)
    rows, version, dense = client.pull([torch.tensor([1, 4]), ...])
    result = run_worker(cfg, index=0, servers=server_rrefs, reporter=reporter_rref, total=100)
"""
from __future__ import annotations

import time

import torch
import torch.distributed.rpc as rpc
import torch.nn.functional as F

from distrec.config import Config, TableSpec, table_specs
from distrec.data.loader import Batch, Columns, ParquetLoader
from distrec.data.manifest import read_manifest, split_files
from distrec.tools.ps.rows import Partition, batch_ids
from distrec.tools.ps.server import dense_model
from distrec.trainer.loss_scale import LossScale


class ServerClient:
    """All servers as one: rows are pulled from and pushed to the server that owns them."""

    def __init__(self, servers: list[rpc.RRef], specs: list[TableSpec], partition: Partition, timeout_s: float):
        self.servers, self.specs, self.partition, self.timeout_s = servers, specs, partition, timeout_s

    def _owners(self, unique: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.partition.owner(u, s.num_rows) for u, s in zip(unique, self.specs)]

    def _local(self, unique, owners, server: int) -> list[torch.Tensor]:
        return [self.partition.local(u[o == server], s.num_rows) for u, o, s in zip(unique, owners, self.specs)]

    def pull(self, unique: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, dict]:
        """(rows of ``unique[t]`` for each table t, server 0's version, the dense parameters)."""
        owners = self._owners(unique)
        futures = [srv.rpc_async(timeout=self.timeout_s).pull(self._local(unique, owners, s), s == 0)
                   for s, srv in enumerate(self.servers)]
        answers = [f.wait() for f in futures]
        rows = [torch.empty(len(u), spec.dim) for u, spec in zip(unique, self.specs)]
        for s, (parts, _, _) in enumerate(answers):
            for t, part in enumerate(parts):
                rows[t][owners[t] == s] = part
        return rows, answers[0][1], answers[0][2]

    def push(self, unique: list[torch.Tensor], grads: list[torch.Tensor], dense_grads: dict) -> list:
        """Start one push per server (server 0 also takes the dense gradients); returns the futures,
        whose values are each server's version before the update."""
        owners = self._owners(unique)
        futures = []
        for s, srv in enumerate(self.servers):
            pieces = [(loc, g[o == s]) for loc, g, o in zip(self._local(unique, owners, s), grads, owners)]
            futures.append(srv.rpc_async(timeout=self.timeout_s).push(pieces, dense_grads if s == 0 else None))
        return futures


def local_step(model, client: ServerClient, batch: Batch, scaler: LossScale | None = None) -> tuple[float, list, int]:
    """Pull, forward, backward, push. Returns (loss sum, push futures, server 0's version at pull).
    With ``scaler`` (train.precision = "fp16") the loss is scaled, and a step whose gradients overflow
    pushes nothing (no futures): the servers' rows, dense weights and optimizer state stay as they are."""
    unique = batch_ids(batch.sparse, len(client.specs))
    rows, version, dense = client.pull(unique)
    model.load_state_dict(dense)
    rows = [r.requires_grad_() for r in rows]
    model.embeddings.set_rows(unique, rows)
    model.zero_grad(set_to_none=True)
    loss_sum = F.binary_cross_entropy_with_logits(model(batch.dense, batch.sparse), batch.labels, reduction="sum")
    (loss_sum * ((scaler.scale if scaler is not None else 1.0) / len(batch))).backward()
    dense_grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    grads = [r.grad if r.grad is not None else torch.zeros_like(r) for r in rows]
    if scaler is not None and not scaler.finite([*dense_grads.values(), *grads]):  # this worker's alone
        return float(loss_sum.detach()), [], version
    return float(loss_sum.detach()), client.push(unique, grads, dense_grads), version


def worker_batches(loader: ParquetLoader, total: int):
    """This worker's slice of each of the first ``total`` global batches, over as many epochs as needed."""
    done, epoch = 0, 0
    while done < total:
        for batch in loader.epoch(epoch):
            yield batch
            done += 1
            if done >= total:
                return
        epoch += 1


def make_worker_loader(cfg: Config, index: int, split: str, train: bool) -> ParquetLoader:
    manifest = read_manifest(cfg.data.path)
    s = cfg.schema
    return ParquetLoader(
        split_files(cfg.data.path, manifest, split), Columns(s.label, s.dense, s.categorical),
        global_batch_size=cfg.train.global_batch_size if train else cfg.eval.batch_size,
        rank=index if train else 0, world_size=cfg.ps.workers if train else 1, seed=cfg.train.seed,
        shuffle=train and cfg.data.shuffle, drop_last=train and cfg.data.drop_last,
        prefetch_batches=cfg.data.prefetch_batches, max_rows=0 if train else cfg.eval.max_rows)


def run_worker(cfg: Config, index: int, servers: list[rpc.RRef], reporter: rpc.RRef, total: int) -> dict:
    """Train this worker's slices of ``total`` global batches; runs on the worker, called by the
    coordinator. Each step's push is waited for only before the next pull (one step in flight), so
    a worker never waits for another worker."""
    torch.set_num_threads(cfg.ps.threads_per_process)
    specs = table_specs(cfg, read_manifest(cfg.data.path).get("cardinalities"))
    model = dense_model(cfg, specs)
    client = ServerClient(servers, specs, Partition(cfg.ps.partition, cfg.ps.servers), cfg.ps.timeout_s)
    loader = make_worker_loader(cfg, index, cfg.data.train_split, train=True)
    pending, steps, start = None, 0, time.perf_counter()
    scaler = LossScale(cfg.train.loss_scale) if cfg.train.precision == "fp16" else None
    for batch in worker_batches(loader, total):
        if pending:
            report(reporter, index, *pending)
        if len(batch) == 0:  # fewer rows than workers in the last batch
            pending = None
            continue
        loss_sum, futures, version = local_step(model, client, batch, scaler)
        pending, steps = (len(batch), loss_sum, futures, version), steps + 1
    if pending:
        report(reporter, index, *pending)
    return {"worker": index, "steps": steps, "seconds": time.perf_counter() - start,
            "skipped": scaler.skipped if scaler is not None else 0}


def report(reporter: rpc.RRef, index: int, rows: int, loss_sum: float, futures: list, version: int) -> None:
    """Wait for a push and tell the coordinator its rows, loss and staleness (updates applied on
    server 0 between this worker's pull and its push)."""
    before = [f.wait() for f in futures][0] if futures else version  # a skipped fp16 step pushed nothing
    reporter.rpc_sync().add(index, rows, loss_sum, before - version)
