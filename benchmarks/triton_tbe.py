"""Embedding lookups on one GPU: distrec's Triton TBE against ``F.embedding_bag`` + ``SparseOptimizer`` (and
fbgemm's TBE where it is importable), forward and forward+backward+update; then DLRM training end to end.

    python benchmarks/triton_tbe.py            # CUDA: Criteo-TB shapes; prints Markdown for docs/benchmarks.md
    python benchmarks/triton_tbe.py --smoke    # CPU: tiny shapes under Triton's interpreter (checks the script)

Shapes by default: the 26 Criteo-TB tables (configs/criteo_terabyte.toml cardinalities, each capped at
--max-rows so the tables, their optimizer state and the torch path's sparse gradients fit one 80 GB GPU),
dim 128, fp32 rows, batch 65536, pooling factor 1 (one-hot) and 20, ids uniform over each table's rows.

Bytes counted, i.e. what a kernel that moves every byte once must move (n ids, U distinct rows, d = dim):
  forward:                  n * d * row bytes (rows read) + n * 8 (ids) + offsets + B * 26 * d * 4 (output)
  forward+backward+update:  forward + n * d * 4 (each id reads its output-gradient row)
                            + U * 2 * (d * row bytes + optimizer state bytes of a row) (read and write once)
Fraction of peak = bytes / time / the GPU's memory bandwidth (PEAK_BYTES_PER_S, or --peak-bw).

End to end: DLRM (MLPerf MLPs 13-512-256-128 and 1024-1024-512-256-1, dot interaction) on one GPU with
all tables in one lookup, dense Adagrad, bf16 autocast for the MLPs (--e2e-precision fp32 to turn it off),
synthetic one-hot batches already on the GPU (data loading is not timed).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from distrec.config import TableSpec, load_config, table_specs
from distrec.model.dlrm import DLRM
from sharding.jagged import JaggedBatch
from sharding.optim import KINDS, OptimSpec, SparseOptimizer
from tbe_batch import Batch

# Memory bandwidth by device name; the first entry whose key is in torch.cuda.get_device_name() wins.
PEAK_BYTES_PER_S = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12),
                    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
                    ("L40S", 0.864e12), ("L4", 0.3e12), ("B200", 8.0e12))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STATE_BYTES_PER_ROW = {"sgd": lambda d: 0, "adagrad": lambda d: 4 * d, "rowwise_adagrad": lambda d: 4,
                       "adam": lambda d: 8 * d}
CRITEO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "criteo_terabyte.toml"
NUM_DENSE = 13


def make_batch(rows: list[int], batch: int, pooling: int, dim: int, device, seed: int) -> Batch:
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = [torch.randint(0, r, (batch * pooling,), generator=gen, device=device) for r in rows]
    starts = torch.tensor([0] + rows[:-1], device=device).cumsum(0)
    global_ids = torch.cat([i + s for i, s in zip(ids, starts)])
    offsets = torch.arange(0, len(rows) * batch * pooling + 1, pooling, device=device)
    grad = torch.randn(batch, len(rows) * dim, generator=gen, device=device)
    return Batch(torch.cat(ids), offsets, global_ids, grad, int(torch.unique(global_ids).numel()))


class TritonImpl:
    name = "triton"

    def __init__(self, rows: list[int], dim: int, optim: OptimSpec, dtype, device):
        from sharding.kernels.triton_tbe import TritonTBE

        self.tbe = TritonTBE([(r, dim) for r in rows], optim, dtype=dtype, device=device)

    def lookup(self, indices, offsets, global_ids) -> torch.Tensor:
        return self.tbe(indices, offsets)

    def after_backward(self) -> None:  # the rows were updated in backward
        pass


class TorchImpl:
    """``F.embedding_bag(sparse=True)`` over one weight holding every table (all have one width), then
    ``SparseOptimizer``; the [T * B, d] result is transposed into the TBE layout [B, T * d]. Its ids come
    already shifted by each table's first row (made with the batch, not timed)."""

    name = "torch"

    def __init__(self, rows: list[int], dim: int, optim: OptimSpec, dtype, device):
        self.tables, self.dim = len(rows), dim
        self.weight = nn.Parameter(torch.empty(sum(rows), dim, dtype=dtype, device=device).uniform_(-0.01, 0.01))
        self.opt = SparseOptimizer([self.weight], optim.kind, optim.lr, optim.eps, optim.betas)

    def lookup(self, indices, offsets, global_ids) -> torch.Tensor:
        out = F.embedding_bag(global_ids, self.weight, offsets[:-1], mode="sum", sparse=True)
        batch = out.shape[0] // self.tables
        return out.float().view(self.tables, batch, self.dim).transpose(0, 1).reshape(batch, -1)

    def after_backward(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class FbgemmImpl:
    name = "fbgemm"

    def __init__(self, rows: list[int], dim: int, optim: OptimSpec, dtype, device):
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            OptimType, SplitTableBatchedEmbeddingBagsCodegen)

        on_gpu = torch.device(device).type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        optim_type = {"sgd": OptimType.EXACT_SGD, "adagrad": OptimType.EXACT_ADAGRAD,
                      "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD, "adam": OptimType.ADAM}[optim.kind]
        precision = {torch.float32: SparseType.FP32, torch.float16: SparseType.FP16,
                     torch.bfloat16: SparseType.BF16}[dtype]
        self.op = SplitTableBatchedEmbeddingBagsCodegen(
            [(r, dim, location, compute) for r in rows], optimizer=optim_type, learning_rate=optim.lr,
            eps=optim.eps, beta1=optim.betas[0], beta2=optim.betas[1], weights_precision=precision,
            output_dtype=SparseType.FP32, device=torch.device(device))

    def lookup(self, indices, offsets, global_ids) -> torch.Tensor:
        return self.op(indices, offsets)

    def after_backward(self) -> None:
        pass


IMPLS = {"triton": TritonImpl, "torch": TorchImpl, "fbgemm": FbgemmImpl}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_iter(fn, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def forward_bytes(b: Batch, dim: int, row_bytes: int) -> int:
    return b.n * dim * row_bytes + b.n * 8 + b.offsets.numel() * 8 + b.grad.numel() * 4


def train_bytes(b: Batch, dim: int, row_bytes: int, kind: str) -> int:
    return (forward_bytes(b, dim, row_bytes) + b.n * dim * 4
            + b.unique * 2 * (dim * row_bytes + STATE_BYTES_PER_ROW[kind](dim)))


def time_impl(impl, b: Batch, args) -> tuple[float, float]:
    """(forward seconds, forward+backward+update seconds) per batch."""
    def forward():
        with torch.no_grad():
            impl.lookup(b.indices, b.offsets, b.global_ids)

    def train():
        impl.lookup(b.indices, b.offsets, b.global_ids).backward(b.grad)
        impl.after_backward()

    return (seconds_per_iter(forward, args.warmup, args.iters, args.device),
            seconds_per_iter(train, args.warmup, args.iters, args.device))


def peak_bandwidth(args) -> float | None:
    if args.peak_bw:
        return args.peak_bw
    if args.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BYTES_PER_S if key in name), None)


def rate_cells(nbytes: int, seconds: float, peak: float | None) -> str:
    rate = nbytes / seconds
    share = f"{100 * rate / peak:.1f} %" if peak else "n/a"
    return f"{seconds * 1e3:.3f} | {rate / 1e9:.1f} | {share}"


def free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def kernel_rows(rows: list[int], args, peak: float | None, failures: list[str]) -> Iterator[str]:
    """One Markdown row per (implementation, pooling factor), as each is measured. A failure (a kernel
    error, out of memory) fills its row and goes into ``failures`` with its traceback; the rest still run."""
    dtype, kind = DTYPES[args.dtype], args.optim
    optim = OptimSpec(kind, lr=0.01)
    row_bytes = torch.empty(0, dtype=dtype).element_size()
    for name in args.impls:
        try:
            impl = IMPLS[name](rows, args.dim, optim, dtype, args.device)
        except Exception as e:
            if name == "fbgemm":  # an optional peer: not installed, a build for another torch, no CPU Adam
                yield f"| {name} | | not available: {type(e).__name__}: {str(e)[:100]} | | | | | |"
                continue
            failures.append(traceback.format_exc())
            yield f"| {name} | | failed: {type(e).__name__}: {str(e)[:100]} | | | | | |"
            continue
        for pooling in args.pooling:
            b = make_batch(rows, args.batch, pooling, args.dim, args.device, seed=pooling)
            try:
                fwd, train = time_impl(impl, b, args)
                yield (f"| {name} | {pooling} | {rate_cells(forward_bytes(b, args.dim, row_bytes), fwd, peak)} | "
                       f"{rate_cells(train_bytes(b, args.dim, row_bytes, kind), train, peak)} |")
            except Exception as e:
                failures.append(traceback.format_exc())
                yield f"| {name} | {pooling} | failed: {type(e).__name__}: {str(e)[:100]} | | | | | |"
            del b
            free(args.device)
        del impl
        free(args.device)


class LookupEmbeddings(nn.Module):
    """DLRM's embedding part on one device: every table in one lookup implementation."""

    @property
    def dims(self) -> list[int]:
        return [s.dim for s in self.specs]

    def __init__(self, specs: list[TableSpec], impl):
        super().__init__()
        self.specs, self.impl = specs, impl
        self.tbe = getattr(impl, "tbe", None)  # a submodule, so .to() and state_dict see the tables
        starts = torch.tensor([0] + [s.num_rows for s in specs[:-1]]).cumsum(0)
        self.register_buffer("starts", starts, persistent=False)

    def forward(self, sparse: JaggedBatch) -> torch.Tensor:
        global_ids = None
        if isinstance(self.impl, TorchImpl):  # only the torch path looks up one concatenated weight
            per_table = sparse.lengths.view(len(self.specs), -1).sum(1)
            global_ids = sparse.values + self.starts.repeat_interleave(per_table, output_size=sparse.values.numel())
        return self.impl.lookup(sparse.values, sparse.offsets(), global_ids)


def e2e_samples_per_s(name: str, rows: list[int], args) -> float:
    """DLRM training steps per second times the batch, one-hot synthetic batches on the device."""
    cfg = load_config(str(CRITEO_CONFIG))
    specs = [TableSpec(s.name, r, args.dim, "sum", 1.0, 1) for s, r in zip(table_specs(cfg), rows)]
    impl = IMPLS[name](rows, args.dim, OptimSpec(cfg.optimizer.sparse, lr=cfg.optimizer.sparse_lr),
                       torch.float32, args.device)
    bottom, top = args.mlps
    model = DLRM(NUM_DENSE, LookupEmbeddings(specs, impl), bottom, top).to(args.device)
    dense_opt = torch.optim.Adagrad(model.dense_parameters(), lr=cfg.optimizer.dense_lr)
    gen = torch.Generator(device=args.device).manual_seed(0)
    keys = [s.name for s in specs]
    batches = []
    for _ in range(2):
        ids = torch.stack([torch.randint(0, r, (args.batch,), generator=gen, device=args.device) for r in rows], 1)
        batches.append((torch.randn(args.batch, NUM_DENSE, generator=gen, device=args.device),
                        JaggedBatch.from_dense(keys, ids.cpu()).to(args.device),
                        torch.randint(0, 2, (args.batch,), generator=gen, device=args.device).float()))
    autocast = torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.e2e_precision == "bf16")
    step = 0

    def train_step():
        nonlocal step
        dense, sparse, labels = batches[step % len(batches)]
        step += 1
        with autocast:
            logits = model(dense, sparse)
        F.binary_cross_entropy_with_logits(logits.float(), labels).backward()
        impl.after_backward()
        dense_opt.step()
        dense_opt.zero_grad(set_to_none=True)

    seconds = seconds_per_iter(train_step, args.warmup, args.e2e_steps, args.device)
    del model, impl, batches
    free(args.device)
    return args.batch / seconds


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for dist in ("triton", "fbgemm-gpu", "fbgemm-gpu-cpu", "fbgemm-gpu-nightly"):
        try:
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def table_rows(args) -> list[int]:
    if args.rows:
        return [args.rows] * args.tables
    cards = load_config(str(CRITEO_CONFIG)).tables.cardinalities
    return [min(c, args.max_rows) for c in cards][:args.tables]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under Triton's interpreter")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--pooling", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20],
                   help="pooling factors, comma-separated")
    p.add_argument("--max-rows", type=int, default=4_000_000, help="cap on each Criteo-TB table's rows")
    p.add_argument("--rows", type=int, default=0, help="give every table this many rows instead")
    p.add_argument("--optim", choices=KINDS, default="rowwise_adagrad")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="embedding row storage")
    p.add_argument("--impls", type=lambda s: s.split(","), default=["triton", "torch", "fbgemm"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-bw", type=float, default=0.0, help="memory bandwidth in bytes/s (default: by GPU name)")
    p.add_argument("--e2e-steps", type=int, default=20, help="DLRM training steps timed; 0 skips end to end")
    p.add_argument("--e2e-impls", type=lambda s: s.split(","), default=["triton", "torch"])
    p.add_argument("--e2e-precision", choices=["bf16", "fp32"], default="bf16", help="the MLPs' precision")
    args = p.parse_args(argv)
    args.mlps = ([512, 256, args.dim], [1024, 1024, 512, 256])
    if args.smoke:
        args.batch, args.dim, args.tables, args.max_rows, args.pooling = 8, 8, 3, 50, [1, 3]
        args.warmup, args.iters, args.e2e_steps = 0, 1, 1
        args.mlps = ([16, args.dim], [16])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke or not torch.cuda.is_available():
        # Triton reads this when it is imported: set before anything here imports it.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device = torch.device("cpu")
        if not args.smoke:
            sys.exit("no CUDA device: the full benchmark needs a GPU; --smoke runs tiny shapes on CPU")
    else:
        args.device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = table_rows(args)
    peak = peak_bandwidth(args)
    device_name = torch.cuda.get_device_name() if args.device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {device_name}; peak {peak / 1e12:.2f} TB/s" if peak else f"device: {device_name}")
    print(f"versions: {versions()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"tables: {len(rows)} x dim {args.dim}, {sum(rows):,} rows ({args.dtype}), batch {args.batch}, "
          f"optimizer {args.optim}; ms per batch, GB/s = counted bytes / time\n")
    print("| impl | pooling | fwd ms | fwd GB/s | fwd % peak | fwd+bwd+update ms | GB/s | % peak |")
    print("|---|---|---|---|---|---|---|---|")
    failures: list[str] = []
    for line in kernel_rows(rows, args, peak, failures):
        print(line, flush=True)
    if args.e2e_steps:
        print(f"\nDLRM training end to end (one-hot, batch {args.batch}, MLPs {args.e2e_precision}):\n")
        print("| embedding lookup | samples/s |")
        print("|---|---|")
        for name in args.e2e_impls:
            try:
                print(f"| {name} | {e2e_samples_per_s(name, rows, args):,.0f} |", flush=True)
            except Exception as e:
                failures.append(traceback.format_exc())
                print(f"| {name} | failed: {type(e).__name__}: {str(e)[:100]} |", flush=True)
                free(args.device)
    for failure in failures:
        print(f"\n{failure}", file=sys.stderr)
    if failures:
        sys.exit(f"{len(failures)} measurement(s) failed; tracebacks above")


if __name__ == "__main__":
    main()
