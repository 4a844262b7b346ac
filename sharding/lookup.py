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
    """Shards grouped by width, each group one weight; ``row_offset[i]`` locates shard i in its group."""

    kernel = "torch"

    def __init__(self, placed: list[Placed], tables: list[TableConfig], seed: int, optim: OptimSpec | None):
        super().__init__()
        self.placed = list(placed)
        self.widths = sorted({p.shard.width for p in placed})
        self.group = [self.widths.index(p.shard.width) for p in placed]
        self.weights, self.row_offset = nn.ParameterList(), [0] * len(placed)
        for g in range(len(self.widths)):
            blocks, start = [], 0
            for i in (i for i in range(len(placed)) if self.group[i] == g):
                blocks.append(_init_shard(seed, placed[i], tables))
                self.row_offset[i], start = start, start + placed[i].shard.num_rows
            self.weights.append(nn.Parameter(torch.cat(blocks)))
        self.optimizer = None
        if optim is not None and len(self.weights):
            self.optimizer = SparseOptimizer(list(self.weights), optim.kind, optim.lr, optim.eps, optim.betas,
                                             l2=optim.l2)
            self.optimizer.init_state()  # eagerly, so checkpoints can take views of it before step 1

    def pool(self, lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
             batch_sizes: list[int]) -> torch.Tensor:
        n, total = len(self.placed), sum(batch_sizes)
        if n == 0:
            return torch.zeros(total, 0, device=values.device)
        lengths, values, weights = table_major(lengths, values, weights, batch_sizes, n)
        if len(self.widths) == 1:  # one width: all bags in one call, then [shard, sample] -> [sample, shard]
            shard_start = torch.tensor(self.row_offset, device=values.device).repeat_interleave(total)
            ids = values + torch.repeat_interleave(shard_start, lengths)
            out = F.embedding_bag(ids, self.weights[0], torch.cumsum(lengths, 0) - lengths, mode="sum",
                                  per_sample_weights=weights, sparse=True)
            return out.view(n, total, self.widths[0]).transpose(0, 1).reshape(total, n * self.widths[0])
        per_shard = lengths.view(n, total).sum(1).tolist()
        ids, wts = torch.split(values, per_shard), torch.split(weights, per_shard) if weights is not None else None
        pieces: list[torch.Tensor | None] = [None] * n
        for g, width in enumerate(self.widths):
            members = [i for i in range(n) if self.group[i] == g]
            group_ids = torch.cat([ids[i] + self.row_offset[i] for i in members])
            group_lengths = lengths.view(n, total)[members].reshape(-1)
            psw = torch.cat([wts[i] for i in members]) if wts is not None else None
            out = F.embedding_bag(group_ids, self.weights[g], torch.cumsum(group_lengths, 0) - group_lengths,
                                  mode="sum", per_sample_weights=psw, sparse=True)
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

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


class BatchedLookup(nn.Module):
    """All shards in one table-batched kernel; the optimizer runs in its backward."""

    def __init__(self, placed: list[Placed], tables: list[TableConfig], seed: int, optim: OptimSpec,
                 kernel: str, device: torch.device):
        super().__init__()
        self.kernel, self.placed = kernel, list(placed)
        shapes = [(p.shard.num_rows, p.shard.width) for p in placed]
        if kernel == "triton":
            from sharding.kernels.triton_tbe import TritonTBE

            self.tbe = TritonTBE(shapes, optim, device=device)
        elif kernel == "cpu":
            from sharding.kernels.cpu_tbe import CpuTBE

            self.tbe = CpuTBE(shapes, optim, device)
        else:
            from sharding.kernels.fbgemm import FbgemmTBE

            self.tbe = FbgemmTBE(shapes, optim, device)
        with torch.no_grad():
            for w, p in zip(self.tbe.table_weights(), placed):
                w.copy_(_init_shard(seed, p, tables))

    def pool(self, lengths: torch.Tensor, values: torch.Tensor, weights: torch.Tensor | None,
             batch_sizes: list[int]) -> torch.Tensor:
        lengths, values, weights = table_major(lengths, values, weights, batch_sizes, len(self.placed))
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        return self.tbe(values, offsets, weights)

    def views(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.tbe.table_weights()[i], self.tbe.table_states()[i]

    def set_lr(self, lr: float) -> None:
        self.tbe.set_lr(lr)

    def step(self) -> None:  # the rows were updated in backward
        pass


def choose_kernel(kernel: str, shapes: list[tuple[int, int]], optim: OptimSpec | None,
                  device: torch.device) -> tuple[str, str]:
    """(kernel to use, why). "auto": on a CPU device distrec's C++ CPU kernel where it is built; else fbgemm's
    op where it can run these shapes; else, on CUDA, distrec's Triton kernels; else torch. An explicit kernel
    that cannot run is an error saying why.

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
        why_not["fbgemm"] = fbgemm.unsupported(shapes, optim, device)
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
                kernel: str, device: torch.device) -> nn.Module:
    """``kernel`` is what ``choose_kernel`` returned; a rank with no shards gets an empty TorchLookup."""
    if kernel == "torch" or not placed:
        return TorchLookup(placed, tables, seed, optim)
    return BatchedLookup(placed, tables, seed, optim, kernel, device)
