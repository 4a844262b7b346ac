"""distrec's CPU kernel (``CpuTBE``) against fbgemm's CPU op (``FbgemmTBE``) and the plain-PyTorch reference
(``F.embedding_bag(sparse=True)`` + ``SparseOptimizer``): one training step of the lookup alone (forward,
backward, the fused update), the three alternating, over a sweep of shapes; prints a Markdown table.

    python benchmarks/cpu_tbe.py            # the full sweep (configs that do not fit --mem-gb are listed as skipped)
    python benchmarks/cpu_tbe.py --quick    # a reduced sweep, a few minutes on 2 cores

Sweep: dims 16/64/128, rows per table 1e3/1e5/1e6, one-hot and multi-hot (20 ids a bag), ids uniform or
Zipf (exponent ZIPF_EXPONENT, ranks shuffled over the rows), rowwise_adagrad and adagrad; 26 tables, batch
2048 (--tables, --batch).

Bytes counted, what a step that moves every byte once must move (n ids, U distinct rows, d = dim, fp32):
  n * d * 4 (rows gathered in forward) + B * T * d * 4 (output written) + B * T * d * 4 (grad_out read)
  + U * 2 * (d * 4 + optimizer state bytes of a row) (each touched row and its state read and written once)
"of bw" = bytes / time / the memory bandwidth measured in the same run (a large tensor copy: read + write).
"""
from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sharding.optim import OptimSpec, SparseOptimizer
from tbe_batch import Batch

ZIPF_EXPONENT = 1.05
COPY_BYTES = 512 * 2**20  # the bandwidth probe's buffer: far past every cache
STATE_BYTES_PER_ROW = {"adagrad": lambda d: 4 * d, "rowwise_adagrad": lambda d: 4}
LR = 0.01


@dataclass(frozen=True)
class Config:
    dim: int
    rows: int
    pooling: int
    dist: str
    kind: str


def draw_ids(rows: int, n: int, dist: str, gen: torch.Generator) -> torch.Tensor:
    if dist == "uniform":
        return torch.randint(0, rows, (n,), generator=gen)
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    drawn = torch.multinomial(ranks.pow(-ZIPF_EXPONENT), n, replacement=True, generator=gen)
    return torch.randperm(rows, generator=gen)[drawn]  # hot rows anywhere in the table, not at its start


def make_batch(cfg: Config, tables: int, batch: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = [draw_ids(cfg.rows, batch * cfg.pooling, cfg.dist, gen) for _ in range(tables)]
    global_ids = torch.cat([i + t * cfg.rows for t, i in enumerate(ids)])
    offsets = torch.arange(0, tables * batch * cfg.pooling + 1, cfg.pooling)
    grad = torch.randn(batch, tables * cfg.dim, generator=gen)
    return Batch(torch.cat(ids), offsets, global_ids, grad, int(torch.unique(global_ids).numel()))


class FusedImpl:
    """CpuTBE or FbgemmTBE: the update runs inside backward."""

    def __init__(self, name: str, shapes, optim: OptimSpec):
        self.name = name
        if name == "cpu":
            from sharding.kernels.cpu_tbe import CpuTBE

            self.tbe = CpuTBE(shapes, optim)
        else:
            from sharding.kernels.fbgemm import FbgemmTBE

            self.tbe = FbgemmTBE(shapes, optim)

    def step(self, b: Batch) -> None:
        self.tbe(b.indices, b.offsets).backward(b.grad)


class TorchImpl:
    """One weight for all tables (global ids), embedding_bag(sparse=True), then SparseOptimizer.step."""

    name = "torch"

    def __init__(self, shapes, optim: OptimSpec):
        rows, dim = sum(r for r, _ in shapes), shapes[0][1]
        self.weight = nn.Parameter(torch.rand(rows, dim) * 0.01)
        self.opt = SparseOptimizer([self.weight], optim.kind, optim.lr, optim.eps)
        self.opt.init_state()
        self.tables = len(shapes)

    def step(self, b: Batch) -> None:
        out = F.embedding_bag(b.global_ids, self.weight, b.offsets[:-1], mode="sum", sparse=True)
        batch = out.shape[0] // self.tables
        out.view(self.tables, batch, -1).transpose(0, 1).reshape(batch, -1).backward(b.grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def step_bytes(cfg: Config, b: Batch, batch: int, tables: int) -> int:
    d = cfg.dim
    return (b.indices.numel() * d * 4 + 2 * batch * tables * d * 4
            + b.unique * 2 * (d * 4 + STATE_BYTES_PER_ROW[cfg.kind](d)))


def impl_bytes(cfg: Config, tables: int) -> int:
    """Weights and optimizer state of one implementation (the torch path's sparse gradient comes on top)."""
    return tables * cfg.rows * (cfg.dim * 4 + STATE_BYTES_PER_ROW[cfg.kind](cfg.dim))


def memory_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once), best of ``repeats``."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * COPY_BYTES / best


def time_config(cfg: Config, args, names: list[str]) -> dict[str, float]:
    """Best seconds of one step per implementation, the implementations alternating each repeat (the best,
    not the median: on a shared machine the other processes only ever add time)."""
    shapes = [(cfg.rows, cfg.dim)] * args.tables
    optim = OptimSpec(cfg.kind, lr=LR)
    impls = [FusedImpl(n, shapes, optim) if n != "torch" else TorchImpl(shapes, optim) for n in names]
    batches = [make_batch(cfg, args.tables, args.batch, seed) for seed in range(2)]
    for impl in impls:  # warm up: first-touch page faults, allocator caches, workspaces
        impl.step(batches[0])
    times = {impl.name: [] for impl in impls}
    for r in range(args.repeats):
        for impl in impls:
            b = batches[r % 2]
            start = time.perf_counter()
            impl.step(b)
            times[impl.name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def sweep(quick: bool) -> list[Config]:
    if not quick:
        return [Config(*c) for c in itertools.product((16, 64, 128), (1_000, 100_000, 1_000_000), (1, 20),
                                                      ("uniform", "zipf"), ("rowwise_adagrad", "adagrad"))]
    configs = [Config(d, r, p, "uniform", "rowwise_adagrad") for d in (16, 64, 128) for r in (1_000, 100_000)
               for p in (1, 20)]
    configs += [Config(64, 100_000, p, "zipf", "rowwise_adagrad") for p in (1, 20)]
    configs += [Config(64, 100_000, 1, "uniform", "adagrad"), Config(64, 1_000_000, 1, "uniform", "rowwise_adagrad")]
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a reduced sweep")
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--mem-gb", type=float, default=8.0,
                   help="skip configs whose tables and state, for all implementations together, need more")
    p.add_argument("--no-torch", action="store_true", help="leave out the (slow) plain-PyTorch path")
    args = p.parse_args()

    from sharding.kernels import cpu_tbe, fbgemm

    names = ["cpu"] if cpu_tbe.load()[0] is not None else []
    names += ["fbgemm"] if fbgemm.available() else []
    names += [] if args.no_torch else ["torch"]
    bandwidth = memory_bandwidth()
    print(f"threads: {torch.get_num_threads()}, measured memory bandwidth (copy): {bandwidth / 1e9:.1f} GB/s; "
          f"{args.tables} tables, batch {args.batch}, best of {args.repeats} steps (forward+backward+update)")
    if "cpu" not in names:
        print(f"distrec's CPU kernel is not built: {cpu_tbe.load()[1]}")
    cols = " | ".join(f"{n} ms" for n in names)
    print(f"\n| dim | rows | ids/bag | id distribution | optimizer | {cols} | fbgemm / cpu | cpu GB/s | cpu of bw |")
    print("|" + "---|" * (8 + len(names)))
    for cfg in sweep(args.quick):
        head = f"| {cfg.dim} | {cfg.rows:.0e} | {cfg.pooling} | {cfg.dist} | {cfg.kind} |"
        need = len(names) * impl_bytes(cfg, args.tables)
        if need > args.mem_gb * 2**30:
            print(f"{head} skipped: needs {need / 2**30:.1f} GiB > --mem-gb {args.mem_gb:g} |")
            continue
        ms = {n: s * 1e3 for n, s in time_config(cfg, args, names).items()}
        b = make_batch(cfg, args.tables, args.batch, 0)
        cells = " | ".join(f"{ms[n]:.2f}" for n in names)
        ratio = f"{ms['fbgemm'] / ms['cpu']:.2f}" if "cpu" in ms and "fbgemm" in ms else "-"  # > 1: cpu is faster
        rate = step_bytes(cfg, b, args.batch, args.tables) / (ms["cpu"] / 1e3) if "cpu" in ms else None
        rate_cells = f"{rate / 1e9:.1f} | {rate / bandwidth:.0%}" if rate else "- | -"
        print(f"{head} {cells} | {ratio} | {rate_cells} |", flush=True)


if __name__ == "__main__":
    main()
