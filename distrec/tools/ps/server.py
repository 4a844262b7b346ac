"""A parameter server: its partition of every table's rows, the dense parameters on server 0, and
the same optimizers as the synchronous trainer, applied as each worker's push arrives.

    server = ParamServer(cfg, specs, index=0, num_servers=1)
    rows, version, dense = server.pull([torch.tensor([3, 7]), ...], with_dense=True)
    before = server.push([(torch.tensor([3, 7]), grad_rows), ...], dense_grads)

Workers reach a server through an ``RRef`` (``server_rref.rpc_async().pull(...)``); RPC handlers run on
several threads at once, so every read and update holds one lock: a pull sees whole updates only.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from distrec.config import Config, TableSpec
from distrec.model.dlrm import DLRM
from distrec.tools.ps.rows import Partition, PulledEmbeddings
from distrec.trainer.checkpoint import load_tensors
from distrec.trainer.optim import dense_optimizer
from sharding.files import atomic_write
from sharding.optim import SparseOptimizer


def dense_model(cfg: Config, specs: list[TableSpec]) -> DLRM:
    """The DLRM whose dense parameters the PS trains, seeded as the sync trainer seeds its model."""
    torch.manual_seed(cfg.train.seed)
    return DLRM.from_config(cfg, PulledEmbeddings(specs))


class ParamServer:
    def __init__(self, cfg: Config, specs: list[TableSpec], index: int, num_servers: int):
        self.index, self.lock, self.version = index, threading.Lock(), 0
        self.partition = Partition(cfg.ps.partition, num_servers)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + index)
        self.weights = [nn.Parameter(self._init_rows(s, gen)) for s in specs]
        o = cfg.optimizer
        self.sparse_opt = SparseOptimizer(self.weights, kind=o.sparse, lr=o.sparse_lr, eps=o.eps, l2=o.sparse_l2)
        self.sparse_opt.init_state()
        self.model = dense_model(cfg, specs) if index == 0 else None
        self.dense_opt = dense_optimizer(o.dense, list(self.model.parameters()), o.dense_lr, o.eps,
                                         o.dense_weight_decay) if self.model else None

    def _init_rows(self, spec: TableSpec, gen: torch.Generator) -> torch.Tensor:
        weight = torch.empty(self.partition.local_rows(spec.num_rows, self.index), spec.dim)
        if not weight.numel():
            return weight
        # Same distribution as the sync tables (tables.init: uniform +-sqrt(1/rows) of the whole table,
        # normal, zeros), not the same values: a PS server holds rows by its own partition.
        if spec.init == "zeros":
            return weight.zero_()
        if spec.init == "normal":
            return weight.normal_(0.0, spec.init_std, generator=gen)
        bound = (1.0 / spec.num_rows) ** 0.5
        return weight.uniform_(-bound, bound, generator=gen)

    def pull(self, local_ids: list[torch.Tensor], with_dense: bool) -> tuple[list, int, dict | None]:
        """(rows of each table at ``local_ids``, this server's version, dense parameters if asked)."""
        with self.lock:
            rows = [w.detach().index_select(0, ids) for w, ids in zip(self.weights, local_ids)]
            dense = {k: v.detach().clone() for k, v in self.model.state_dict().items()} \
                if with_dense and self.model else None
            return rows, self.version, dense

    def push(self, grads: list[tuple[torch.Tensor, torch.Tensor]], dense_grads: dict | None) -> int:
        """Apply one worker step's gradients; returns the version before it (updates applied so far)."""
        with self.lock:
            for w, (ids, g) in zip(self.weights, grads):
                w.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), g, w.shape, check_invariants=False) if ids.numel() else None
            self.sparse_opt.step()
            self.sparse_opt.zero_grad(set_to_none=True)
            if dense_grads is not None and self.model is not None:
                for name, p in self.model.named_parameters():
                    p.grad = dense_grads[name]
                self.dense_opt.step()
                self.dense_opt.zero_grad(set_to_none=True)
            self.version += 1
            return self.version - 1

    def state(self) -> dict:
        """Everything a restart needs: rows, optimizer state, dense model and optimizer, version."""
        with self.lock:
            return {"index": self.index, "partition": self.partition.kind, "servers": self.partition.servers,
                    "version": self.version, "weights": [w.detach().clone() for w in self.weights],
                    "sparse_opt": self.sparse_opt.state_dict(),
                    "dense": self.model.state_dict() if self.model else None,
                    "dense_opt": self.dense_opt.state_dict() if self.dense_opt else None}

    def save(self, folder: str) -> str:
        """Write this server's state to ``folder/server_<index>.pt``, whole or not at all."""
        path = Path(folder) / f"server_{self.index}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state()
        atomic_write(path, lambda f: torch.save(state, f))
        return str(path)

    def load(self, folder: str) -> int:
        """Restore from ``folder/server_<index>.pt``; returns the restored version."""
        state = load_tensors(Path(folder) / f"server_{self.index}.pt")  # tensors and plain data only
        if (state["partition"], state["servers"]) != (self.partition.kind, self.partition.servers):
            raise ValueError(f"checkpoint {folder} was saved by {state['servers']} {state['partition']}-partitioned "
                             f"servers; this run has {self.partition.servers} {self.partition.kind}-partitioned")
        with self.lock, torch.no_grad():
            for w, saved in zip(self.weights, state["weights"]):
                w.copy_(saved)
            self.sparse_opt.load_state_dict(state["sparse_opt"])
            if self.model is not None:
                self.model.load_state_dict(state["dense"])
                self.dense_opt.load_state_dict(state["dense_opt"])
            self.version = state["version"]
        return self.version
