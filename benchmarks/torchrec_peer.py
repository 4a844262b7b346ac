"""Peer benchmark: distrec's sharded runtime vs TorchRec's DistributedModelParallel, same model, plan
and batches, 2 CPU ranks over gloo, one run after the other on this machine.

    .venv/bin/python benchmarks/torchrec_peer.py --steps 30 --plan both [--repeats 2] [--kernel fbgemm]

Model: DLRM as configs/demo.toml (13 dense, 26 tables of dim 16 with the demo cardinalities, sum
pooling, bottom MLP [64, 16], top MLP [64, 32, 1], dot interaction). Batch: global 8192 (4096 per rank),
one-hot Zipf ids, 10 fixed batches per rank made before timing. Optimizers: exact Adagrad (lr 0.05) on
the embeddings (distrec: ``--kernel fbgemm``, the same fused fbgemm CPU op TorchRec uses, or ``torch``,
its plain-PyTorch path; TorchRec: its fused fbgemm kernel), Adam (lr 0.001) on the dense
part under DDP. TorchRec gets the very same shard placement as distrec's ``simple_plan``, built with
``construct_module_sharding_plan``; its CPU sharder is told that row-wise is allowed on CPU.

Each framework runs in its own spawned 2-rank process group; a rank writes its result to a file before
tearing down, because TorchRec processes may abort at exit after the work is done. The two frameworks
run alternately ``--repeats`` times each and the best run counts (other jobs on a shared machine skew
single runs). Prints a Markdown table with global samples/s (8192 * steps / slowest rank's wall
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
from sharding.types import TableConfig

WORLD = 2
GLOBAL_BATCH = 8192
NUM_BATCHES = 10
WARMUP_STEPS = 5
SPARSE_LR, DENSE_LR, EPS = 0.05, 0.001, 1e-8
RANK_TIMEOUT_S = 900
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
TORCHREC_EBC = "sparse_arch.embedding_bag_collection"  # module path of the EBC inside torchrec's DLRM


# ---- shared set-up ---------------------------------------------------------------------------------

def demo_setup():
    """(tables, config) of configs/demo.toml."""
    cfg = load_config(str(ROOT / "configs" / "demo.toml"))
    return [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in table_specs(cfg)], cfg


def make_batches(tables: list[TableConfig], num_dense: int, rank: int) -> list[Batch]:
    """This rank's fixed synthetic batches: dense in [0, 1), one Zipf id per table, ~12% positives."""
    local = GLOBAL_BATCH // WORLD
    rng = np.random.default_rng(1000 + rank)
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(NUM_BATCHES):
        ids = np.stack([zipf_ids(rng, local, t.num_rows, 1.1) for t in tables], 1)
        sparse = JaggedBatch.from_dense([t.name for t in tables], torch.from_numpy(ids))
        out.append(Batch(torch.rand(local, num_dense, generator=g), sparse,
                         (torch.rand(local, generator=g) < 0.12).float()))
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


# ---- distrec ---------------------------------------------------------------------------------------

def distrec_rank(rank: int, world: int, plan_kind: str, steps: int, kernel: str) -> dict:
    from distrec.trainer.dist import DistContext
    from distrec.trainer.step import train_step
    from distrec.model.dlrm import DLRM
    from distrec.trainer.dense_parallel import wrap_dense
    from sharding.optim import OptimSpec
    from sharding.planner import simple_plan
    from sharding.runtime import EmbeddingOptimizer, ShardedEmbeddingCollection

    tables, cfg = demo_setup()
    emb = ShardedEmbeddingCollection(tables, simple_plan(tables, world, plan_kind), rank=rank, seed=0,
                                     optim=OptimSpec("adagrad", SPARSE_LR, EPS), kernel=kernel)
    torch.manual_seed(0)
    model = DLRM.from_config(cfg, emb)
    opts = [torch.optim.Adam(model.dense_parameters(), lr=DENSE_LR, eps=EPS), EmbeddingOptimizer(emb)]
    ddp, opts = wrap_dense(model, opts, DistContext(rank, world, rank, torch.device("cpu"), "gloo"))
    batches = make_batches(tables, len(cfg.schema.dense), rank)
    times = time_steps(lambda b: train_step(ddp, emb, opts, b, GLOBAL_BATCH), batches, steps)
    rows = sum(s.num_rows for _, s, _ in emb.shard_weights())
    name = {"torch": "F.embedding_bag(sparse=True) + SparseOptimizer",
            "fbgemm": "fbgemm SplitTableBatchedEmbeddingBagsCodegen (CPU, EXACT_ADAGRAD fused in backward)"}
    return {**times, "rows_held": rows, "kernel": name[emb.kernel]}


# ---- TorchRec --------------------------------------------------------------------------------------

def cpu_sharder(plan_kinds: list[str]):
    """EmbeddingBagCollectionSharder that allows the given sharding types on CPU (stock: no row-wise)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class CpuEBCSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return list(plan_kinds)

    return CpuEBCSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": SPARSE_LR,
                                       "eps": EPS})


def torchrec_plan(ebc, tables: list[TableConfig], plan_kind: str, sharder, world: int):
    """TorchRec's ShardingPlan placing every table exactly as distrec's ``simple_plan`` does."""
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingPlan

    from sharding.planner import simple_plan

    ours = simple_plan(tables, world, plan_kind)
    per_table = {t.name: row_wise(compute_kernel="fused") if plan_kind == "row_wise"
                 else table_wise(rank=ours.tables[t.name].shards[0].rank, compute_kernel="fused") for t in tables}
    module_plan = construct_module_sharding_plan(ebc, per_table, sharder=sharder, local_size=world,
                                                 world_size=world, device_type="cpu")
    return ShardingPlan({TORCHREC_EBC: module_plan})


def torchrec_model(tables: list[TableConfig], cfg):
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows,
                                  feature_names=[t.name], pooling=PoolingType.SUM) for t in tables]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=len(cfg.schema.dense),
                dense_arch_layer_sizes=list(cfg.model.bottom_mlp),
                over_arch_layer_sizes=[*cfg.model.top_mlp, 1], dense_device=torch.device("cpu"))


def kernel_names(dmp) -> str:
    """The embedding kernels DMP built (its lookups are plain lists, so ``dmp.modules()`` misses them)."""
    sebc = dmp.module.sparse_arch.embedding_bag_collection
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
    for name, ps in plan.plan[TORCHREC_EBC].items():
        shards = ps.sharding_spec.shards if ps.sharding_spec is not None else []
        where = ", ".join(f"rows {s.shard_offsets[0]}-{s.shard_offsets[0] + s.shard_sizes[0] - 1}@{s.placement}"
                          for s in shards if s.shard_sizes[0])
        lines.append(f"{name}: {ps.sharding_type}, kernel {ps.compute_kernel}, {where}")
    return lines


def torchrec_rank(rank: int, world: int, plan_kind: str, steps: int) -> dict:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    tables, cfg = demo_setup()
    model = torchrec_model(tables, cfg)
    sharder = cpu_sharder([plan_kind])
    plan = torchrec_plan(model.sparse_arch.embedding_bag_collection, tables, plan_kind, sharder, world)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=plan, sharders=[sharder])
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    opt = torch.optim.Adam(dense, lr=DENSE_LR, eps=EPS)
    batches = [(b.dense, b.sparse.to_kjt(), b.labels) for b in make_batches(tables, len(cfg.schema.dense), rank)]

    def step(batch) -> float:
        dense_x, kjt, labels = batch
        loss = F.binary_cross_entropy_with_logits(dmp(dense_x, kjt).squeeze(1), labels)
        loss.backward()  # the fused kernel updates the embedding rows during backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

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


def run_ranks(fn, *args) -> tuple[list[dict], list[int]]:
    """``fn(rank, WORLD, *args)`` on WORLD spawned gloo ranks: (each rank's result, exit codes), or
    RuntimeError naming the first failure. A non-zero exit after a rank wrote its result is no failure."""
    with tempfile.TemporaryDirectory(prefix="torchrec_peer_") as workdir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_rank_entry, args=(fn, r, WORLD, workdir, args)) for r in range(WORLD)]
        for p in procs:
            p.start()
        _wait(procs, workdir)
        results = [_read_result(workdir, r) for r in range(WORLD)]
        for r, res in enumerate(results):  # a rank's own error first: the others may just have been killed
            if res is not None and "error" in res:
                raise RuntimeError(f"rank {r} failed:\n{res['error']}")
        for r, res in enumerate(results):
            if res is None:
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
        return [res["ok"] for res in results], [p.exitcode for p in procs]


# ---- report ----------------------------------------------------------------------------------------

def measure(fn, plan_kind: str, steps: int, *extra) -> dict:
    """{'samples_s', 'samples_cpu_s', 'ranks', 'exit_codes'} or {'error'} for one run of one framework
    and plan; both rates are global samples over the slowest rank's wall or CPU seconds."""
    try:
        ranks, codes = run_ranks(fn, plan_kind, steps, *extra)
    except RuntimeError as e:
        return {"error": str(e)}
    samples = GLOBAL_BATCH * steps
    return {"samples_s": samples / max(r["seconds"] for r in ranks),
            "samples_cpu_s": samples / max(r["cpu_seconds"] for r in ranks), "ranks": ranks, "exit_codes": codes}


def measure_pair(plan_kind: str, steps: int, repeats: int, kernel: str) -> tuple[list[dict], list[dict]]:
    """distrec's and TorchRec's runs, alternating, so that load from elsewhere hits both alike."""
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(measure(distrec_rank, plan_kind, steps, kernel))
        theirs.append(measure(torchrec_rank, plan_kind, steps))
        if "error" in ours[-1] or "error" in theirs[-1]:
            break
    return ours, theirs


def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "samples_s" in r]
    return max(ok, key=lambda r: r["samples_s"]) if ok else runs[-1]


def last_line(error: str) -> str:
    lines = [ln for ln in error.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else error


def table_rows(plan_kind: str, ours: dict, theirs: dict) -> list[str]:
    def cell(res, key):
        return f"{res[key]:,.0f}" if key in res else f"failed: {last_line(res['error'])}"

    def ratio(key):
        return f"{ours[key] / theirs[key]:.2f}x" if key in ours and key in theirs else "-"

    return [f"| distrec ShardedEmbeddingCollection | {plan_kind} | {cell(ours, 'samples_s')} | "
            f"{ratio('samples_s')} | {cell(ours, 'samples_cpu_s')} | {ratio('samples_cpu_s')} |",
            f"| TorchRec DistributedModelParallel | {plan_kind} | {cell(theirs, 'samples_s')} | | "
            f"{cell(theirs, 'samples_cpu_s')} | |"]


def details(plan_kind: str, name: str, runs: list[dict]) -> list[str]:
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
    p.add_argument("--kernel", choices=["fbgemm", "torch"], default="fbgemm", help="distrec's lookup kernel")
    args = p.parse_args(argv)
    kinds = ["row_wise", "table_wise"] if args.plan == "both" else [args.plan]
    rows, notes = [], []
    for kind in kinds:  # may grow by a table-wise fallback
        ours, theirs = measure_pair(kind, args.steps, args.repeats, args.kernel)
        rows += table_rows(kind, best(ours), best(theirs))
        notes += [f"\n### {kind}", *details(kind, "distrec", ours), *details(kind, "TorchRec", theirs),
                  *torchrec_plan_lines(theirs)]
        if kind == "row_wise" and "error" in best(theirs) and "table_wise" not in kinds:
            notes.append("\nTorchRec could not run row-wise on CPU (error above): falling back to table-wise.")
            kinds.append("table_wise")
    print(f"DLRM (configs/demo.toml), {WORLD} CPU ranks over gloo, 1 thread each, global batch {GLOBAL_BATCH}, "
          f"{args.steps} timed steps after {WARMUP_STEPS} warm-up, best of {args.repeats} alternating runs, "
          f"distrec kernel {args.kernel}\n")
    print("| framework | plan | samples/s | distrec ÷ TorchRec | samples per CPU-s | distrec ÷ TorchRec (CPU) |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
