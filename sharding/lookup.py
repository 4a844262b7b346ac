"""The local lookup of the sharded runtime: every bag a rank received, pooled with its shard, in one call.

    lookup = make_lookup(placed, tables, seed=0, optim=OptimSpec("adagrad", 0.05), kernel="auto")
    pooled = lookup.pool(lengths, ids, weights, batch_sizes=[3, 2])   # [5, sum of shard widths]

Bags come in the order the input all-to-all delivers them: by source rank, then shard, then sample
(source s sent ``batch_sizes[s]`` bags for each shard). The result has one row per sample, sources in
order, with the shards' columns side by side: exactly what the output all-to-all sends back, a block of
rows per source. Both implementations first reorder the bags table-major (shard, source, sample), the
layout a table-batched kernel takes.

- ``TorchLookup``: ``F.embedding_bag(sparse=True)`` once per shard width, then ``SparseOptimizer`` on the
  row-sparse gradients after backward. Needs torch only; the reference the others are tested against.
- ``BatchedLookup``: one ``TableBatchedEmbedding`` kernel call for all shards (distrec's C++ CPU kernel,
  fbgemm's op, or distrec's Triton kernels), which updates the rows inside backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sharding.init import init_rows
from sharding.optim import OptimSpec, SparseOptimizer
from sharding.rounding import DTYPES
from sharding.types import KERNELS, Shard, TableConfig



@dataclass(frozen=True)
class Placed:
    """A shard of table ``table`` (index into the table list), as the runtime places it."""

    table: int
    shard: Shard


def _take_ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Indices of the ranges [starts[k], starts[k] + counts[k]) one after another."""
    total = int(counts.sum())
    out_starts = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - out_starts, counts, output_size=total) + torch.arange(total)


def table_major(lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
                batch_sizes: list[int], n_shards: int):
    """Bags (source, shard, sample) -> (shard, source, sample); returns (lengths, values, weights)."""
    if n_shards <= 1 or len(batch_sizes) <= 1:
        return lengths, values, weights
    b = torch.tensor(batch_sizes, dtype=torch.int64)
    source_start = n_shards * (torch.cumsum(b, 0) - b)
    starts = (source_start[None, :] + torch.arange(n_shards)[:, None] * b[None, :]).reshape(-1)
    bags = _take_ranges(starts, b.repeat(n_shards))
    bag_start = torch.cumsum(lengths, 0) - lengths
    ids = _take_ranges(bag_start[bags], lengths[bags])
    return lengths[bags], values[ids], weights[ids] if weights is not None else None


def _init_shard(seed: int, p: Placed, tables: list[TableConfig]) -> torch.Tensor:
    t, s = tables[p.table], p.shard
    return init_rows(seed, p.table, t.num_rows, t.dim, (s.row_start, s.row_end), (s.col_start, s.col_end),
                     t.init, t.init_std)


class TorchLookup(nn.Module):
    """Shards grouped by (width, storage dtype), each group one weight; ``row_offset[i]`` locates shard i
    in its group.

    fp32 groups are looked up by ``F.embedding_bag(sparse=True)`` and leave a row-sparse ``.grad``. A
    half-precision group (fp16, bf16: ``TableConfig.precision``) is looked up as the kernels do: its
    touched rows gathered into an fp32 leaf, pooled in fp32, and that leaf's gradient (the touched rows')
    updated by ``SparseOptimizer.update_rows`` in ``step()``, rounded to the stored dtype
    (``sharding.rounding``; ``stochastic_rounding``). Its weight is a parameter without gradient."""

    kernel = "torch"

    def __init__(self, placed: list[Placed], tables: list[TableConfig], seed: int, optim: OptimSpec | None,
                 stochastic_rounding: bool = True, device: torch.device | str = "cpu"):
        super().__init__()
        self.placed = list(placed)
        keys = [(p.shard.width, tables[p.table].precision) for p in placed]
        self.keys = sorted(set(keys))
        self.widths = [width for width, _ in self.keys]
        self.group = [self.keys.index(k) for k in keys]
        self.weights, self.row_offset = nn.ParameterList(), [0] * len(placed)
        for g, (_, precision) in enumerate(self.keys):
            blocks, start = [], 0
            for i in (i for i in range(len(placed)) if self.group[i] == g):
                blocks.append(_init_shard(seed, placed[i], tables))
                self.row_offset[i], start = start, start + placed[i].shard.num_rows
            # On its device before the optimizer makes its state: a later module.to() would not move that
            weight = torch.cat(blocks).to(device=device, dtype=DTYPES[precision])
            self.weights.append(nn.Parameter(weight, requires_grad=weight.dtype == torch.float32))
        self.touched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # half group -> (rows, fp32 leaf)
        self.optimizer = None
        if optim is not None and len(self.weights):
            self.optimizer = SparseOptimizer(list(self.weights), optim.kind, optim.lr, optim.eps, optim.betas,
                                             l2=optim.l2, stochastic_rounding=stochastic_rounding)
            self.optimizer.init_state()  # eagerly, so checkpoints can take views of it before step 1

    def _bags(self, g: int, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Group ``g``'s pooled bags (sum) in fp32."""
        weight = self.weights[g]
        if weight.dtype == torch.float32:
            return F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=weights, sparse=True)
        rows, local = torch.unique(ids, return_inverse=True)
        leaf = weight.detach().index_select(0, rows).float().requires_grad_(torch.is_grad_enabled())
        if leaf.requires_grad:
            self.touched[g] = (rows, leaf)
        return F.embedding_bag(local.reshape(-1), leaf, offsets, mode="sum", per_sample_weights=weights)

    def pool(self, lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
             batch_sizes: list[int]) -> torch.Tensor:
        n, total = len(self.placed), sum(batch_sizes)
        if n == 0:
            return torch.zeros(total, 0, device=values.device)
        lengths, values, weights = table_major(lengths, values, weights, batch_sizes, n)
        if len(self.widths) == 1:  # one width: all bags in one call, then [shard, sample] -> [sample, shard]
            shard_start = torch.tensor(self.row_offset, device=values.device).repeat_interleave(total)
            ids = values + torch.repeat_interleave(shard_start, lengths)
            out = self._bags(0, ids, torch.cumsum(lengths, 0) - lengths, weights)
            return out.view(n, total, self.widths[0]).transpose(0, 1).reshape(total, n * self.widths[0])
        per_shard = lengths.view(n, total).sum(1).tolist()
        ids, wts = torch.split(values, per_shard), torch.split(weights, per_shard) if weights is not None else None
        pieces: list[torch.Tensor | None] = [None] * n
        for g, width in enumerate(self.widths):
            members = [i for i in range(n) if self.group[i] == g]
            group_ids = torch.cat([ids[i] + self.row_offset[i] for i in members])
            group_lengths = lengths.view(n, total)[members].reshape(-1)
            psw = torch.cat([wts[i] for i in members]) if wts is not None else None
            out = self._bags(g, group_ids, torch.cumsum(group_lengths, 0) - group_lengths, psw)
            # unbind, not slicing: a slice's backward would build a zero gradient of all of ``out`` each
            for i, piece in zip(members, out.view(len(members), total, width).unbind(0)):
                pieces[i] = piece
        return torch.cat(pieces, dim=1)

    def views(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Shard i's rows and optimizer state (views: writing them changes the shard)."""
        w, start, rows = self.weights[self.group[i]], self.row_offset[i], self.placed[i].shard.num_rows
        state = self.optimizer.state[w] if self.optimizer is not None else {}
        return w.data[start:start + rows], {k: v if v.dim() == 0 else v[start:start + rows] for k, v in state.items()}

    def set_lr(self, lr: float) -> None:
        """The learning rate of later steps (a schedule's); the state is kept."""
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def set_salt(self, salt: int) -> None:
        """Half-precision groups: the stochastic rounding's salt of the next step (the training step)."""
        if self.optimizer is not None:
            self.optimizer.salt = int(salt)

    def step(self) -> None:
        if self.optimizer is not None:
            for g, (rows, leaf) in self.touched.items():
                if leaf.grad is not None:
                    self.optimizer.update_rows(self.weights[g], rows, leaf.grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.touched.clear()

    def grads(self) -> list[torch.Tensor]:
        """The gradient values the next ``step`` applies (fp32 groups' ``.grad``, half groups' rows):
        writable, so a loss scale can unscale them in place."""
        out = [p.grad._values() if p.grad.is_sparse else p.grad for p in self.weights if p.grad is not None]
        return out + [leaf.grad for _, leaf in self.touched.values() if leaf.grad is not None]

    def discard(self) -> None:
        """Drop the gradients of this step: the next ``step`` updates nothing it would have."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.touched.clear()


def make_tbe(kernel: str, shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device,
             dtype: torch.dtype = torch.float32, stochastic_rounding: bool = True):
    """A ``sharding.kernels`` table-batched embedding of ``kernel`` ("cpu", "fbgemm", "triton")."""
    if kernel == "triton":
        from sharding.kernels.triton_tbe import TritonTBE as TBE
    elif kernel == "cpu":
        from sharding.kernels.cpu_tbe import CpuTBE as TBE
    else:
        from sharding.kernels.fbgemm import FbgemmTBE as TBE
    return TBE(shapes, optim, device=device, dtype=dtype, stochastic_rounding=stochastic_rounding)


class BatchedLookup(nn.Module):
    """All shards of one storage precision in one table-batched kernel (one kernel in all, unless
    per-table precisions differ on this rank); the optimizer runs in its backward.

    ``deferred`` (fp16 loss scaling): backward keeps each kernel's gradient instead of updating (``grads()``,
    writable: a loss scale unscales them in place), ``step()`` applies it or ``discard()`` drops it: a step
    whose gradients overflowed then changes no row and no optimizer state."""

    def __init__(self, placed: list[Placed], tables: list[TableConfig], seed: int, optim: OptimSpec,
                 kernel: str, device: torch.device, stochastic_rounding: bool = True, deferred: bool = False):
        super().__init__()
        self.kernel, self.placed = kernel, list(placed)
        precisions = [tables[p.table].precision for p in placed]
        self.precisions = sorted(set(precisions))
        # members[k]: the shards (positions in ``placed``) the k-th kernel holds, in order
        self.members = [[i for i, x in enumerate(precisions) if x == precision] for precision in self.precisions]
        self.tbes = nn.ModuleList(
            make_tbe(kernel, [(placed[i].shard.num_rows, placed[i].shard.width) for i in members], optim, device,
                     DTYPES[precision], stochastic_rounding)
            for precision, members in zip(self.precisions, self.members))
        for tbe in self.tbes:
            tbe.deferred = deferred
        self._where = {i: (k, j) for k, members in enumerate(self.members) for j, i in enumerate(members)}
        with torch.no_grad():
            for i, p in enumerate(placed):
                self.views(i)[0].copy_(_init_shard(seed, p, tables))

    def pool(self, lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
             batch_sizes: list[int]) -> torch.Tensor:
        n = len(self.placed)
        lengths, values, weights = table_major(lengths, values, weights, batch_sizes, n)
        if len(self.tbes) == 1:
            return self.tbes[0](values, offsets_of(lengths), weights)
        total = sum(batch_sizes)
        per_shard = lengths.view(n, total).sum(1).tolist()
        ids, wts = torch.split(values, per_shard), torch.split(weights, per_shard) if weights is not None else None
        pieces: list[torch.Tensor | None] = [None] * n
        for tbe, members in zip(self.tbes, self.members):
            group_lengths = lengths.view(n, total)[members].reshape(-1)
            psw = torch.cat([wts[i] for i in members]) if wts is not None else None
            out = tbe(torch.cat([ids[i] for i in members]), offsets_of(group_lengths), psw)
            for i, piece in zip(members, torch.split(out, [self.placed[i].shard.width for i in members], 1)):
                pieces[i] = piece
        return torch.cat(pieces, dim=1)

    def views(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k, j = self._where[i]
        return self.tbes[k].table_weights()[j], self.tbes[k].table_states()[j]

    def set_lr(self, lr: float) -> None:
        for tbe in self.tbes:
            tbe.set_lr(lr)

    def set_salt(self, salt: int) -> None:
        for tbe in self.tbes:
            tbe.set_salt(salt)

    def step(self) -> None:
        """Deferred: apply the kept gradients; else nothing (backward updated the rows)."""
        for tbe in self.tbes:
            for grad, *lookup in tbe.pending:
                tbe.apply_gradient(grad, *lookup)
            tbe.pending.clear()

    def grads(self) -> list[torch.Tensor]:
        return [grad for tbe in self.tbes for grad, *_ in tbe.pending]

    def discard(self) -> None:
        for tbe in self.tbes:
            tbe.pending.clear()


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def choose_kernel(kernel: str, shapes: list[tuple[int, int]], optim: OptimSpec | None, device: torch.device,
                  precisions: set[str] = frozenset({"fp32"}), deferred: bool = False,
                  stochastic_rounding: bool = True) -> tuple[str, str]:
    """(kernel to use, why). "auto": on a CPU device distrec's C++ CPU kernel where it is built; else fbgemm's
    op where it can run these shapes; else, on CUDA, distrec's Triton kernels; else torch. An explicit kernel
    that cannot run is an error saying why. ``precisions``: the tables' storage precisions on any rank;
    ``deferred``: updates must wait for ``step()`` (fp16 loss scaling), which fbgemm's op cannot.

        choose_kernel("auto", [(1000, 16)], OptimSpec("adagrad", 0.05), torch.device("cpu"))
        # ("cpu", "distrec's CPU kernel ..."), or ("fbgemm", "...; not cpu: <why>") where it is not built
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown embedding kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return "torch", "asked for"
    if optim is None:
        if kernel != "auto":
            raise ValueError(f"embedding kernel {kernel} fuses the optimizer into backward: give optim")
        return "torch", "no optimizer given (forward only)"
    from sharding.kernels import cpu_tbe, fbgemm, triton_tbe

    why_not = {}
    # Before fbgemm on CPU: any width, Adam and L2 too, and a backward several times faster (benchmarks/cpu_tbe.py).
    if kernel == "cpu" or (kernel == "auto" and device.type == "cpu"):
        why_not["cpu"] = cpu_tbe.unsupported(shapes, optim, device)
        if why_not["cpu"] is None:
            return "cpu", "distrec's CPU kernel (C++) with the optimizer fused into backward"
    if kernel in ("auto", "fbgemm"):
        why_not["fbgemm"] = ("fp16 loss scaling applies the sparse update after the overflow check, and fbgemm's "
                             "op updates inside its backward" if deferred else
                             next(filter(None, (fbgemm.unsupported(shapes, optim, device, DTYPES[x], stochastic_rounding)
                                                for x in sorted(precisions))), None))
        if why_not["fbgemm"] is None:
            return "fbgemm", "; ".join(["fbgemm_gpu's table-batched op with its fused optimizer"]
                                       + [f"not {k}: {v}" for k, v in why_not.items() if v])
    # On CPU, Triton runs only under its interpreter (tests): never an automatic choice there.
    if kernel == "triton" or (kernel == "auto" and device.type == "cuda"):
        why_not["triton"] = triton_tbe.unsupported(device)
        if why_not["triton"] is None:
            return "triton", "distrec's Triton kernels with the optimizer fused into backward"
    if kernel != "auto":
        raise ValueError(f"embedding kernel {kernel} cannot run this plan: {why_not[kernel]}")
    return "torch", "; ".join(f"not {k}: {v}" for k, v in why_not.items())


def make_lookup(placed: list[Placed], tables: list[TableConfig], seed: int, optim: OptimSpec | None,
                kernel: str, device: torch.device, stochastic_rounding: bool = True, deferred: bool = False) -> nn.Module:
    """``kernel`` is what ``choose_kernel`` returned; a rank with no shards gets an empty TorchLookup.
    ``deferred``: updates wait for ``step()`` (the torch kernel's always do)."""
    if kernel == "torch" or not placed:
        return TorchLookup(placed, tables, seed, optim, stochastic_rounding, device)
    return BatchedLookup(placed, tables, seed, optim, kernel, device, stochastic_rounding, deferred)
