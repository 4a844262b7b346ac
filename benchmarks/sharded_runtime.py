"""Sharded runtime benchmarks on this machine: the fused lookups (plain PyTorch; fbgemm's table-batched
op) vs a per-table loop, and the share of a 2-rank training step spent in communication.

    .venv/bin/python benchmarks/sharded_runtime.py --steps 30

Tables and batch follow configs/demo.toml (26 tables, dim 16, global batch 8192, one-hot Zipf ids).
Prints Markdown rows for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn


from distrec.config import load_config, table_specs
from distrec.model.dlrm import DLRM
from distrec.tools.data.synth import zipf_ids
from distrec.trainer.optim import make_optimizers, sparse_spec
from distrec.trainer.phases import EXCHANGES, PhaseTimer
from distrec.trainer.step import train_step
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec
from sharding.planner import simple_plan
from sharding.runtime import EmbeddingOptimizer, ShardedEmbeddingCollection
from sharding.types import TableConfig
from tests.ranks import run_ranks



def demo_tables() -> tuple[list[TableConfig], object]:
    cfg = load_config("configs/demo.toml")
    return [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in table_specs(cfg)], cfg


def make_batches(tables, batch: int, count: int, seed: int) -> list[JaggedBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = np.stack([zipf_ids(rng, batch, t.num_rows, 1.1) for t in tables], 1)
        out.append(JaggedBatch.from_dense([t.name for t in tables], torch.from_numpy(ids)))
    return out


class PerTableLoop(nn.Module):
    def __init__(self, tables):
        super().__init__()
        self.bags = nn.ModuleList(nn.EmbeddingBag(t.num_rows, t.dim, mode="sum", sparse=True) for t in tables)

    def forward(self, jb: JaggedBatch) -> torch.Tensor:
        batch = jb.batch_size
        values = torch.split(jb.values, jb.length_per_key())
        offsets = torch.arange(batch)
        return torch.cat([bag(v, offsets) for bag, v in zip(self.bags, values)], 1)


def time_steps(module, opt, batches, steps: int) -> float:
    """Seconds per forward + backward + optimizer step."""
    def step(jb):
        module(jb).sum().backward()
        opt.step()
        opt.zero_grad()

    for jb in batches[:3]:
        step(jb)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return (time.perf_counter() - start) / steps


def fused_vs_loop(steps: int) -> tuple[dict[str, float], float]:
    """({kernel: seconds per step} for the fused lookups, seconds per step for the per-table loop)."""
    tables, _ = demo_tables()
    batches = make_batches(tables, 8192, 8, seed=0)
    fused = {}
    for kernel in ("torch", "fbgemm"):
        emb = ShardedEmbeddingCollection(tables, simple_plan(tables, 1, "table_wise"), seed=0,
                                         optim=OptimSpec("adagrad", 0.05), kernel=kernel)
        fused[kernel] = time_steps(emb, EmbeddingOptimizer(emb), batches, steps)
    loop = PerTableLoop(tables)
    t_loop = time_steps(loop, torch.optim.Adagrad(list(loop.parameters()), lr=0.05), batches, steps)
    return fused, t_loop


def comm_rank(rank: int, world: int, steps: int) -> tuple[float, dict]:
    """(seconds per DLRM training step, the step-time breakdown: phases and each all-to-all's overlap)
    on this rank."""
    from distrec.trainer.dist import DistContext
    from distrec.data.loader import Batch
    from distrec.trainer.dense_parallel import wrap_dense
    tables, cfg = demo_tables()
    timer = PhaseTimer()
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, world, "row_wise"), rank=rank, seed=0,
                                     optim=sparse_spec(cfg.optimizer), kernel="fbgemm", timer=timer)
    torch.manual_seed(0)
    model = DLRM.from_config(cfg, emb)
    ddp, opts = wrap_dense(model, make_optimizers(cfg.optimizer, model),
                           DistContext(rank, world, rank, torch.device("cpu"), "gloo"))
    local = 8192 // world
    sparse = make_batches(tables, local, 4, seed=rank)
    g = torch.Generator().manual_seed(rank)
    batches = [Batch(torch.rand(local, 13, generator=g), s, (torch.rand(local, generator=g) < 0.12).float())
               for s in sparse]
    for b in batches[:3]:
        train_step(ddp, emb, opts, b, 8192)
    timer.rows, timer.current, timer.flights = [], {}, {}  # warm-up steps left out
    start = time.perf_counter()
    for i in range(steps):
        began = time.perf_counter()
        train_step(ddp, emb, opts, batches[i % len(batches)], 8192)
        timer.end_step(time.perf_counter() - began)
    return (time.perf_counter() - start) / steps, timer.summary(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    fused, t_loop = fused_vs_loop(args.steps)
    per_rank = run_ranks(2, comm_rank, args.steps)
    step = max(r[0] for r in per_rank)
    exposed = max(sum(r[1]["ms"][x] for x in EXCHANGES) for r in per_rank) / 1e3
    flights = {x: max(r[1]["overlap_ms"][x]["in_flight"] for r in per_rank) for x in EXCHANGES}
    hidden = {x: max(r[1]["overlap_ms"][x]["hidden"] for r in per_rank) for x in EXCHANGES}
    print("| measure | value |\n|---|---|")
    for kernel, t in fused.items():
        print(f"| embedding fwd+bwd+Adagrad, batch 8192, 26 tables, 1 rank: fused runtime, kernel {kernel} | "
              f"{t * 1e3:.1f} ms ({t_loop / t:.2f}x the loop) |")
    print(f"| same, per-table nn.EmbeddingBag loop + torch Adagrad (sparse) | {t_loop * 1e3:.1f} ms |")
    print(f"| DLRM step, 2 ranks row-wise, fbgemm kernel, global batch 8192 | {step * 1e3:.1f} ms "
          f"({8192 / step:,.0f} samples/s) |")
    print(f"| of which exposed in the sparse all-to-alls (ids, pooled, gradients: starts and waits, rank max) | "
          f"{exposed * 1e3:.1f} ms ({exposed / step:.0%}) |")
    for x in EXCHANGES:
        print(f"| {x}: in flight / hidden behind other work (rank max) | {flights[x]:.1f} / {hidden[x]:.1f} ms |")


if __name__ == "__main__":
    main()
