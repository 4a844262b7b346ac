"""Fused sparse optimizers for embedding shards.

The optimizer runs on the rank that owns the rows: it reads the (row-sparse) gradient
of a shard, updates only the rows that gradient touches, and keeps its state tensors
next to the shard (same rows, same device), so a checkpoint can slice them by row.

    weight = torch.nn.Parameter(torch.randn(50, 6))
    opt = SparseOptimizer([weight], kind="rowwise_adagrad", lr=0.1)
    out = F.embedding_bag(torch.tensor([3, 3, 7]), weight, torch.tensor([0, 2]),
                          mode="sum", sparse=True)
    out.sum().backward()
    opt.step()          # rows 3 and 7 change; state["row_sum"] has shape [50]
    SparseOptimizer([weight], kind="sgd", lr=0.1, l2=1e-4)   # + L2 on the rows each step touches

Kinds and their update of a touched row r with summed gradient g:

- ``sgd``:             w[r] -= lr * g
- ``adagrad``:         s[r] += g**2;  w[r] -= lr * g / (sqrt(s[r]) + eps)
                       (``torch.optim.Adagrad`` with sparse grads; eps outside the sqrt,
                       as in fbgemm's EXACT_ADAGRAD)
- ``rowwise_adagrad``: s[r] += mean(g**2);  w[r] -= g * lr / (sqrt(s[r]) + eps)
                       (fbgemm's EXACT_ROWWISE_ADAGRAD; one accumulator per row)
- ``adam``:            lazy Adam, ``torch.optim.SparseAdam``: m, v and w of untouched rows
                       stay as they are; the bias correction uses a per-param step count.

L2 on touched rows (``l2``, the config's ``optimizer.sparse_l2``), per touched row per step: before the
rule above, ``g[r] += l2 * w[r]`` once per step for every row r with at least one id in the global
batch (the gradient's rows), however many times it occurs, and never for untouched rows. That is the
L2 of TF's and DeepRec's sparse optimizers (a penalty ``l2 / 2 * |w[r]|^2`` per touched row); a
per-occurrence penalty (the loss summed ``l2 / 2 * |w|^2`` over every looked-up id) would instead add
``count * l2 * w[r]``, so hot rows would be pulled to 0 harder than rare ones. The shard that owns a
row adds it once whatever the number of ranks, and a replicated table adds it after its gradients are
summed over ranks (``ShardedEmbeddingCollection.sync_replica_grads``), so sharded runs equal one process.
For ``adam`` it is coupled L2 (it enters the moments), not AdamW's decoupled decay.

Gradients: a sparse COO ``.grad`` (as ``F.embedding_bag(..., sparse=True)`` produces,
duplicates allowed) is coalesced first, so each row gets exactly one update per step.
A dense ``.grad`` is accepted too: a row counts as touched iff its gradient row has a
nonzero entry. That matters only for ``adam``, where an all-zero row is left alone
rather than having its moments decayed as dense Adam would do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sharding.rounding import round_to
from sharding.types import OPTIMIZERS, check_optimizer, state_names

KINDS = OPTIMIZERS  # the names are the kit's vocabulary (sharding.types)


@dataclass(frozen=True)
class OptimSpec:
    """A sparse optimizer as the fused kernels take it: ``OptimSpec("rowwise_adagrad", lr=0.05, l2=1e-4)``;
    ``l2`` is the penalty on touched rows described in this module's docstring."""

    kind: str
    lr: float
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)
    l2: float = 0.0

    def __post_init__(self):
        check_optimizer(self.kind)
        if self.l2 < 0.0:
            raise ValueError(f"invalid l2 {self.l2}: must be >= 0")


class SparseOptimizer(torch.optim.Optimizer):
    """Row-sparse SGD / Adagrad / row-wise Adagrad / lazy Adam over [rows, width] weights."""

    def __init__(self, params, kind: str, lr: float, eps: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999), l2: float = 0.0, stochastic_rounding: bool = True):
        check_optimizer(kind)
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if l2 < 0.0:
            raise ValueError(f"invalid l2 {l2}")
        # kind lives in the param group so a saved state_dict says what its state means.
        super().__init__(params, dict(kind=kind, lr=lr, eps=eps, betas=tuple(betas), l2=l2,
                                      stochastic_rounding=stochastic_rounding))
        self.salt = 0  # half-precision weights: the rounding's salt of the next step (sharding.rounding)

    def init_state(self) -> None:
        """Make every param's state now (zeros), not at its first step, so it can be viewed and loaded."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    _init_state(self.state[p], p, group["kind"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_optimizer(group["kind"])
            for p in group["params"]:
                if p.grad is not None:
                    self.update_rows(p, *_touched_rows(p.grad), group)
        self.salt += 1
        return loss

    @torch.no_grad()
    def update_rows(self, p: Tensor, rows: Tensor, g: Tensor, group: dict | None = None) -> None:
        """The update of ``p``'s distinct ``rows`` by their summed gradient ``g`` [len(rows), width]: what
        ``step`` does with ``p.grad``. Half-precision weights, whose gradient is fp32 rows kept apart (a
        ``.grad`` has the weight's dtype), are updated by calling it directly, then ``step()`` with no
        ``.grad`` to advance the rounding's salt.

        fp32 weights are updated in place; fp16/bf16 ones through an fp32 copy of the touched rows,
        computed exactly as fp32 weights would be and rounded back by ``sharding.rounding.round_to``."""
        if p.dim() != 2:
            raise ValueError(f"sparse optimizer expects [rows, width] weights, got {tuple(p.shape)}")
        group = group if group is not None else self.param_groups[0]
        kind = group["kind"]
        state = self.state[p]
        if not state:
            _init_state(state, p, kind)
        if kind == "adam":
            # Counted even when no row is touched, as torch.optim.SparseAdam does.
            state["step"] += 1
        if rows.numel() == 0:
            return
        half = p.dtype != torch.float32
        # w and at: what the rules below update in place, and where the touched rows are in it
        w, at = (p.index_select(0, rows).float(), torch.arange(rows.numel())) if half else (p, rows)
        if group.get("l2", 0.0):  # skipped at 0, so runs without it are unchanged bit for bit
            # A multiply then an add, as the Triton kernel rounds them (no fused multiply-add).
            g = g + group["l2"] * w.index_select(0, at)
        if kind == "sgd":
            w.index_add_(0, at, g, alpha=-group["lr"])
        elif kind == "adagrad":
            _adagrad(w, at, rows, g, state["sum"], group)
        elif kind == "rowwise_adagrad":
            _rowwise_adagrad(w, at, rows, g, state["row_sum"], group)
        else:
            _adam(w, at, rows, g, state, group)
        if half:
            p.index_copy_(0, rows, round_to(w, p.dtype, group.get("stochastic_rounding", True), self.salt))


def _init_state(state: dict, p: Tensor, kind: str) -> None:
    for name, rule in state_names(kind).items():
        if rule == "scalar":
            # float32 like torch's own optimizers; load_state_dict leaves "step" uncast.
            state[name] = torch.tensor(0.0, dtype=torch.float32)
        elif rule == "row":
            state[name] = p.new_zeros(p.shape[0], dtype=torch.float32)
        else:  # fp32 whatever the weights' precision
            state[name] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)


def _touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(unique row ids, their summed gradient rows), without densifying a sparse grad."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:
            raise ValueError("sparse grad must be row-sparse (sparse_dim 1), as embedding_bag makes")
        # The updates are nonlinear in g, so duplicate rows must be summed before use. unique +
        # index_add does that several times faster than coalesce() on CPU.
        if grad.is_coalesced():
            return grad.indices()[0], grad.values()
        rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)
        values = grad._values()
        summed = values.new_zeros(rows.numel(), *grad.shape[1:]).index_add_(0, inverse, values)
        return rows, summed
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


# The rules: ``w[at]`` are the weights of the state's ``rows`` (the same index for fp32 weights updated in
# place; for half ones, positions in an fp32 copy of those rows).
def _adagrad(w: Tensor, at: Tensor, rows: Tensor, g: Tensor, state_sum: Tensor, group: dict) -> None:
    s = state_sum.index_select(0, rows).add_(g * g)
    state_sum.index_copy_(0, rows, s)
    w.index_add_(0, at, g / s.sqrt_().add_(group["eps"]), alpha=-group["lr"])


def _rowwise_adagrad(w: Tensor, at: Tensor, rows: Tensor, g: Tensor, row_sum: Tensor, group: dict) -> None:
    s = row_sum.index_select(0, rows).add_(g.pow(2).mean(dim=1))
    row_sum.index_copy_(0, rows, s)
    # Same association as fbgemm's CPU kernel: one multiplier per row, then g * multiplier.
    multiplier = group["lr"] / (s.sqrt() + group["eps"])
    w.index_add_(0, at, g * multiplier.unsqueeze(1), alpha=-1.0)


def _adam(w: Tensor, at: Tensor, rows: Tensor, g: Tensor, state: dict, group: dict) -> None:
    # Written as torch.optim._functional.sparse_adam computes it (old + (new - old) * (1 - b))
    # so the results agree with torch.optim.SparseAdam bit for bit, not just approximately.
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    m_old = exp_avg.index_select(0, rows)
    v_old = exp_avg_sq.index_select(0, rows)
    m = g.sub(m_old).mul_(1 - beta1).add_(m_old)
    v = g.pow(2).sub_(v_old).mul_(1 - beta2).add_(v_old)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    t = int(state["step"].item())
    step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    w.index_add_(0, at, -step_size * m.div_(v.sqrt_().add_(group["eps"])))
