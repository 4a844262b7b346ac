"""Peer benchmark: distrec's sharded runtime vs TorchRec's DistributedModelParallel, same model, plan
and batches, CPU ranks over gloo, one run after the other on this machine.

    .venv/bin/python benchmarks/torchrec_peer.py --steps 30 --plan both [--repeats 2] [--kernel auto]

Model: DLRM as configs/demo.toml (13 dense, 26 tables of dim 16 with the demo cardinalities, sum
pooling, bottom MLP [64, 16], top MLP [64, 32, 1], dot interaction). Batch: global 8192 (4096 per rank),
one-hot Zipf ids, 10 fixed batches per rank made before timing. Optimizers: exact Adagrad (lr 0.05) on
the embeddings (distrec: its default kernel, or ``--kernel fbgemm``, the same fused fbgemm CPU op TorchRec
uses, or ``torch``, its plain-PyTorch path; TorchRec: its fused fbgemm kernel), Adam (lr 0.001) on the
dense part under DDP. TorchRec gets the very same shard placement as distrec's plan, built with
``construct_module_sharding_plan``; its CPU sharder is told that row-wise is allowed on CPU.

Every shape here is a ``Setup``; ``benchmarks/speed_sweep.py`` runs this same machinery over a sweep of
shapes, for the whole DLRM step and for the sparse part alone (``part="sparse"``: the embedding
collection's forward, backward and fused update, with a fixed upstream gradient).

Each framework runs in its own spawned process group; a rank writes its result to a file before
tearing down, because TorchRec processes may abort at exit after the work is done. The two frameworks
run alternately ``--repeats`` times each and the best run counts (other jobs on a shared machine skew
single runs). Prints a Markdown table with global samples/s (global batch * steps / slowest rank's wall
seconds; also per CPU second, which other jobs disturb less) and distrec / TorchRec, then per-run
numbers, the kernels, and the plan TorchRec's DMP actually used.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from distrec.config import load_config, table_specs
from distrec.data.loader import Batch
from distrec.tools.data.synth import zipf_ids
from sharding.comm import close_process_group, init_process_group
from sharding.files import atomic_write
from sharding.jagged import JaggedBatch
from sharding.types import ShardingPlan, ShardingType, TableConfig

NUM_BATCHES = 10
WARMUP_STEPS = 5
SPARSE_LR, DENSE_LR, EPS = 0.05, 0.001, 1e-8
ZIPF_EXPONENT = 1.1  # as distrec data synth's default skew
POSITIVE_RATE = 0.12  # ~ Criteo's click rate
RANK_TIMEOUT_S = 1800
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
TORCHREC_EBC = "sparse_arch.embedding_bag_collection"  # module path of the EBC inside torchrec's DLRM
TORCHREC_OPTIM = {"adagrad": "EXACT_ADAGRAD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD", "sgd": "EXACT_SGD"}
PLANS = ("table_wise", "row_wise", "planner")


@dataclass(frozen=True)
class Setup:
    """One benchmark shape: the tables, the DLRM around them, the batch, the plan and the ranks.

        Setup(tables=(TableConfig("t0", 100_000, 64),) * 26, num_dense=13, bottom_mlp=(256, 64),
              top_mlp=(512, 256), batch_per_rank=2048, world=2, plan="row_wise", hot=20, ids="uniform")

    ``plan``: "table_wise" / "row_wise" (distrec's ``simple_plan``) or "planner" (distrec's planner on
    the CPU preset); TorchRec is given the same placement. ``part``: "dlrm" (the whole step) or "sparse"
    (the embedding collection alone)."""

    tables: tuple[TableConfig, ...]
    num_dense: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    batch_per_rank: int
    world: int
    plan: str = "row_wise"
    hot: int = 1
    ids: str = "zipf"
    optimizer: str = "adagrad"
    part: str = "dlrm"

    @property
    def global_batch(self) -> int:
        return self.batch_per_rank * self.world


def demo_setup(world: int = 2, plan: str = "row_wise") -> Setup:
    """configs/demo.toml's tables and MLPs, global batch 8192."""
    cfg = load_config(str(ROOT / "configs" / "demo.toml"))
    tables = tuple(TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in table_specs(cfg))
    return Setup(tables, len(cfg.schema.dense), tuple(cfg.model.bottom_mlp), tuple(cfg.model.top_mlp),
                 8192 // world, world, plan)


def make_batches(setup: Setup, rank: int) -> list[Batch]:
    """This rank's fixed synthetic batches: dense in [0, 1), ``hot`` ids per (sample, table) drawn Zipf or
    uniform over the table's rows, ~12% positives."""
    n, tables = setup.batch_per_rank, setup.tables
    rng = np.random.default_rng(1000 + rank)
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(NUM_BATCHES):
        ids = [zipf_ids(rng, n * setup.hot, t.num_rows, ZIPF_EXPONENT) if setup.ids == "zipf"
               else rng.integers(0, t.num_rows, n * setup.hot) for t in tables]
        sparse = JaggedBatch([t.name for t in tables], torch.from_numpy(np.concatenate(ids)).to(torch.int64),
                             torch.full((len(tables) * n,), setup.hot, dtype=torch.int64))
        out.append(Batch(torch.rand(n, setup.num_dense, generator=g), sparse,
                         (torch.rand(n, generator=g) < POSITIVE_RATE).float()))
    return out


def time_steps(step, batches: list, steps: int) -> dict:
    """Wall and CPU seconds (this process, all threads) for ``steps`` calls of ``step(batch)`` after a
    warm-up, started together on all ranks. CPU time is the less load-sensitive one on a shared machine."""
    for i in range(WARMUP_STEPS):
        step(batches[i % len(batches)])
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        step(batches[i % len(batches)])
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}


def upstream_grad(setup: Setup, rank: int) -> torch.Tensor:
    """The fixed gradient the sparse-only step sends back into the pooled embeddings."""
    g = torch.Generator().manual_seed(7 + rank)
    return torch.randn(setup.batch_per_rank, sum(t.dim for t in setup.tables), generator=g) / setup.global_batch


def distrec_plan(setup: Setup) -> ShardingPlan:
    from sharding.planner import simple_plan

    if setup.plan != "planner":
        return simple_plan(list(setup.tables), setup.world, setup.plan)
    from sharding.planner import Workload, make_topology, plan_tables

    work = Workload(setup.batch_per_rank, setup.optimizer, pooling={t.name: float(setup.hot) for t in setup.tables})
    return plan_tables(list(setup.tables), make_topology("cpu", setup.world), work).plan


# ---- distrec ---------------------------------------------------------------------------------------

def distrec_rank(rank: int, world: int, setup: Setup, steps: int, kernel: str) -> dict:
    from distrec.model.dlrm import DLRM
    from distrec.trainer.dense_parallel import wrap_dense
    from distrec.trainer.dist import DistContext
    from distrec.trainer.step import train_step
    from sharding.optim import OptimSpec
    from sharding.runtime import EmbeddingOptimizer, ShardedEmbeddingCollection

    emb = ShardedEmbeddingCollection(list(setup.tables), distrec_plan(setup), rank=rank, seed=0,
                                     optim=OptimSpec(setup.optimizer, SPARSE_LR, EPS), kernel=kernel)
    batches = make_batches(setup, rank)
    if setup.part == "sparse":
        grad = upstream_grad(setup, rank)

        def step(batch):
            (emb(batch.sparse) * grad).sum().backward()
            emb.step()
    else:
        torch.manual_seed(0)
        model = DLRM(setup.num_dense, emb, list(setup.bottom_mlp), list(setup.top_mlp))
        opts = [torch.optim.Adam(model.dense_parameters(), lr=DENSE_LR, eps=EPS), EmbeddingOptimizer(emb)]
        backend = "gloo" if world > 1 else "none"
        ddp, opts = wrap_dense(model, opts, DistContext(rank, world, rank, torch.device("cpu"), backend))

        def step(batch):
            train_step(ddp, emb, opts, batch, setup.global_batch)
    times = time_steps(step, batches, steps)
    rows = sum(s.num_rows for _, s, _ in emb.shard_weights())
    return {**times, "rows_held": rows, "kernel": f"{emb.kernel} ({emb.kernel_reason})"}


# ---- TorchRec --------------------------------------------------------------------------------------

def cpu_sharder(plan_kinds: list[str], optimizer: str):
    """EmbeddingBagCollectionSharder that allows the given sharding types on CPU (stock: no row-wise)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class CpuEBCSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return list(plan_kinds)

    optim = getattr(EmbOptimType, TORCHREC_OPTIM[optimizer])
    return CpuEBCSharder(fused_params={"optimizer": optim, "learning_rate": SPARSE_LR, "eps": EPS})


def torchrec_placement(ours: ShardingPlan, tables: tuple[TableConfig, ...]) -> dict:
    """Per table, TorchRec's generator for the placement of distrec's plan ``ours``."""
    from torchrec.distributed import sharding_plan as sp

    out = {}
    for t in tables:
        tp = ours.tables[t.name]
        kind, ranks = tp.sharding_type, [s.rank for s in tp.shards]
        if kind is ShardingType.TABLE_WISE:
            out[t.name] = sp.table_wise(rank=ranks[0], compute_kernel="fused")
        elif kind is ShardingType.ROW_WISE:
            out[t.name] = sp.row_wise(compute_kernel="fused")
        elif kind is ShardingType.COLUMN_WISE:
            out[t.name] = sp.column_wise(size_per_rank=[s.width for s in tp.shards], compute_kernel="fused")
        elif kind is ShardingType.DATA_PARALLEL:
            out[t.name] = sp.data_parallel()
        else:
            raise ValueError(f"table {t.name}: no TorchRec placement for {kind.value} in this benchmark")
    return out


def torchrec_plan(module, module_path: str, setup: Setup, sharder):
    """TorchRec's ShardingPlan placing every table exactly as distrec's plan does."""
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingPlan as TorchrecPlan

    module_plan = construct_module_sharding_plan(module, torchrec_placement(distrec_plan(setup), setup.tables),
                                                 sharder=sharder, local_size=setup.world,
                                                 world_size=setup.world, device_type="cpu")
    return TorchrecPlan({module_path: module_plan})


def torchrec_ebc(setup: Setup):
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows,
                                  feature_names=[t.name], pooling=PoolingType.SUM) for t in setup.tables]
    return EmbeddingBagCollection(tables=configs, device=torch.device("meta"))


def torchrec_model(setup: Setup):
    from torchrec.models.dlrm import DLRM

    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=torchrec_ebc(setup), dense_in_features=setup.num_dense,
                dense_arch_layer_sizes=list(setup.bottom_mlp), over_arch_layer_sizes=[*setup.top_mlp, 1],
                dense_device=torch.device("cpu"))


def sharded_ebc(dmp):
    return dmp.module if dmp.plan.plan.get("") is not None else dmp.module.sparse_arch.embedding_bag_collection


def kernel_names(dmp) -> str:
    """The embedding kernels DMP built (its lookups are plain lists, so ``dmp.modules()`` misses them)."""
    sebc = sharded_ebc(dmp)
    kernels = {f"{type(sharding).__name__}, {type(op).__name__} over {type(op.emb_module).__name__} "
               f"(optimizer {op.emb_module.optimizer.name}, use_cpu={op.emb_module.use_cpu})"
               for sharding, lookup in zip(sebc._embedding_shardings, sebc._lookups) for op in lookup._emb_modules}
    return "; ".join(sorted(kernels))


def local_rows(dmp) -> int:
    """Embedding rows this rank really holds, from DMP's sharded state dict."""
    rows = 0
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key and hasattr(value, "local_shards"):
            rows += sum(s.tensor.shape[0] for s in value.local_shards())
    return rows


def plan_summary(plan) -> list[str]:
    """One line per table: sharding type, compute kernel, and rows per rank."""
    lines = []
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
            where = ", ".join(f"rows {s.shard_offsets[0]}-{s.shard_offsets[0] + s.shard_sizes[0] - 1} cols "
                              f"{s.shard_offsets[1]}+{s.shard_sizes[1]}@{s.placement}"
                              for s in shards if s.shard_sizes[0])
            lines.append(f"{name}: {ps.sharding_type}, kernel {ps.compute_kernel}, {where}")
    return lines


def torchrec_rank(rank: int, world: int, setup: Setup, steps: int) -> dict:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    kinds = sorted({tp.sharding_type.value for tp in distrec_plan(setup).tables.values()})
    sharder = cpu_sharder(kinds, setup.optimizer)
    sparse_only = setup.part == "sparse"
    model = torchrec_ebc(setup) if sparse_only else torchrec_model(setup)
    path = "" if sparse_only else TORCHREC_EBC
    inner = model if sparse_only else model.sparse_arch.embedding_bag_collection
    plan = torchrec_plan(inner, path, setup, sharder)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=[sharder])
    batches = [(b.dense, b.sparse.to_kjt(), b.labels) for b in make_batches(setup, rank)]
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    if sparse_only:
        grad = upstream_grad(setup, rank)

        def step(batch):
            (dmp(batch[1]).values() * grad).sum().backward()  # the fused kernel updates rows in backward
    else:
        opt = torch.optim.Adam(dense, lr=DENSE_LR, eps=EPS)

        def step(batch):
            dense_x, kjt, labels = batch
            loss = F.binary_cross_entropy_with_logits(dmp(dense_x, kjt).squeeze(1), labels, reduction="sum")
            (loss / setup.global_batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    times = time_steps(step, batches, steps)
    return {**times, "rows_held": local_rows(dmp), "kernel": kernel_names(dmp),
            "dense_params": len(dense), "plan": plan_summary(dmp.plan) if rank == 0 else []}


# ---- processes -------------------------------------------------------------------------------------

def _rank_entry(fn, rank: int, world: int, workdir: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(workdir, "store"), world)
    init_process_group("gloo", rank=rank, world_size=world, store=store, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = {"ok": fn(rank, world, *args)}
    except Exception:
        result = {"error": traceback.format_exc()}
    atomic_write(os.path.join(workdir, f"rank{rank}.json"), json.dumps(result))  # before teardown, which may abort
    close_process_group()


def _read_result(workdir: str, rank: int) -> dict | None:
    path = Path(workdir) / f"rank{rank}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _wait(procs, workdir: str) -> None:
    """Wait for all ranks; once one has failed (error, or exit without a result), give the rest, which
    may be stuck in a collective with it, a few seconds."""
    deadline = time.monotonic() + RANK_TIMEOUT_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(not p.is_alive() and "ok" not in (_read_result(workdir, r) or {}) for r, p in enumerate(procs)):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()


def run_ranks(fn, world: int, *args) -> tuple[list[dict], list[int]]:
    """``fn(rank, world, *args)`` on ``world`` spawned gloo ranks: (each rank's result, exit codes), or
    RuntimeError naming the first failure. A non-zero exit after a rank wrote its result is no failure."""
    with tempfile.TemporaryDirectory(prefix="torchrec_peer_") as workdir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_entry, args=(fn, r, world, workdir, args)) for r in range(world)]
        for p in procs:
            p.start()
        _wait(procs, workdir)
        results = [_read_result(workdir, r) for r in range(world)]
        for r, res in enumerate(results):  # a rank's own error first: the others may just have been killed
            if res is not None and "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
        for r, res in enumerate(results):
            if res is None:
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
        return [res["ok"] for res in results], [p.exitcode for p in procs]


# ---- report ----------------------------------------------------------------------------------------

def measure(fn, setup: Setup, steps: int, *extra) -> dict:
    """{'samples_s', 'samples_cpu_s', 'ranks', 'exit_codes'} or {'error'} for one run of one framework;
    both rates are global samples over the slowest rank's wall or CPU seconds."""
    try:
        ranks, codes = run_ranks(fn, setup.world, setup, steps, *extra)
    except RuntimeError as e:
        return {"error": str(e)}
    samples = setup.global_batch * steps
    return {"samples_s": samples / max(r["seconds"] for r in ranks),
            "samples_cpu_s": samples / max(r["cpu_seconds"] for r in ranks), "ranks": ranks, "exit_codes": codes}


def measure_pair(setup: Setup, steps: int, repeats: int, kernel: str) -> tuple[list[dict], list[dict]]:
    """distrec's and TorchRec's runs, alternating, so that load from elsewhere hits both alike."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(measure(distrec_rank, setup, steps, kernel))
        theirs.append(measure(torchrec_rank, setup, steps))
        if "error" in ours[-1] or "error" in theirs[-1]:
            break
    return ours, theirs


def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "samples_s" in r]
    return max(ok, key=lambda r: r["samples_s"]) if ok else runs[-1]


def ratio(ours: dict, theirs: dict, key: str = "samples_s") -> float | None:
    return ours[key] / theirs[key] if key in ours and key in theirs else None


def last_line(error: str) -> str:
    lines = [ln for ln in error.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else error


def table_rows(plan_kind: str, ours: dict, theirs: dict) -> list[str]:
    def cell(res, key):
        return f"{res[key]:,.0f}" if key in res else f"failed: {last_line(res['error'])}"

    def times(key):
        r = ratio(ours, theirs, key)
        return f"{r:.2f}x" if r is not None else "-"

    return [f"| distrec ShardedEmbeddingCollection | {plan_kind} | {cell(ours, 'samples_s')} | "
            f"{times('samples_s')} | {cell(ours, 'samples_cpu_s')} | {times('samples_cpu_s')} |",
            f"| TorchRec DistributedModelParallel | {plan_kind} | {cell(theirs, 'samples_s')} | | "
            f"{cell(theirs, 'samples_cpu_s')} | |"]


def details(name: str, runs: list[dict]) -> list[str]:
    res = best(runs)
    if "error" in res:
        return [f"- {name} failed:\n```\n{res['error'].strip()}\n```"]
    every = ", ".join(f"{r['samples_s']:,.0f}" for r in runs if "samples_s" in r)
    secs = ", ".join(f"{r['seconds']:.2f} ({r['cpu_seconds']:.2f} CPU)" for r in res["ranks"])
    rows = ", ".join(str(r["rows_held"]) for r in res["ranks"])
    return [f"- {name}: samples/s of each run [{every}]; best run: seconds per rank [{secs}], embedding rows "
            f"held per rank [{rows}], exit codes {res['exit_codes']}; kernel: {res['ranks'][0]['kernel']}"]


def torchrec_plan_lines(runs: list[dict]) -> list[str]:
    res = best(runs)
    if "ranks" not in res:
        return []
    return [f"- TorchRec: {res['ranks'][0]['dense_params']} dense parameters under Adam; plan as DMP used it:",
            *(f"    {line}" for line in res["ranks"][0]["plan"])]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (after %d warm-up)" % WARMUP_STEPS)
    p.add_argument("--plan", choices=["row_wise", "table_wise", "both"], default="row_wise")
    p.add_argument("--repeats", type=int, default=2, help="runs per framework, alternating; the best counts")
    p.add_argument("--kernel", choices=["auto", "cpu", "fbgemm", "torch"], default="auto",
                   help="distrec's lookup kernel")
    args = p.parse_args(argv)
    kinds = ["row_wise", "table_wise"] if args.plan == "both" else [args.plan]
    rows, notes = [], []
    for kind in kinds:  # may grow by a table-wise fallback
        ours, theirs = measure_pair(demo_setup(plan=kind), args.steps, args.repeats, args.kernel)
        rows += table_rows(kind, best(ours), best(theirs))
        notes += [f"\n### {kind}", *details("distrec", ours), *details("TorchRec", theirs),
                  *torchrec_plan_lines(theirs)]
        if kind == "row_wise" and "error" in best(theirs) and "table_wise" not in kinds:
            notes.append("\nTorchRec could not run row-wise on CPU (error above): falling back to table-wise.")
            kinds.append("table_wise")
    print(f"DLRM (configs/demo.toml), 2 CPU ranks over gloo, 1 thread each, global batch 8192, "
          f"{args.steps} timed steps after {WARMUP_STEPS} warm-up, best of {args.repeats} alternating runs, "
          f"distrec kernel {args.kernel}\n")
    print("| framework | plan | samples/s | distrec ÷ TorchRec | samples per CPU-s | distrec ÷ TorchRec (CPU) |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
