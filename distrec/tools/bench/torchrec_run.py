"""The TorchRec peer of one ``distrec bench`` run: TorchRec's ``DistributedModelParallel`` training the
config's DLRM on the same data, batches, sample budget and table placement as ``distrec.train``.

    torchrun --standalone --nproc_per_node 2 -m distrec.tools.bench.torchrec_run --config configs/demo.toml \
        --data.path=DIR --train.max_steps=20 --strategy row_wise --result out.json

Embeddings: TorchRec's fused fbgemm CPU kernel with exact Adagrad (the config's sparse lr and eps); dense
part under DDP with the config's dense optimizer; with ``train.precision = "bf16"`` the model's forward runs
under bf16 autocast as distrec's dense part does (fbgemm's lookup has no autocast rule: it stays fp32). The plan is distrec's: ``--strategy`` is a built-in
placement or a plan file from ``distrec plan --json``, translated table by table. Rank 0 writes the
result before tearing down, because TorchRec processes may abort at exit after the work is done.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

EBC = "sparse_arch.embedding_bag_collection"  # module path of the EBC inside torchrec's DLRM


def torchrec_model(tables, cfg):
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    configs = [EmbeddingBagConfig(name=t.name, embedding_dim=t.dim, num_embeddings=t.num_rows,
                                  feature_names=[t.name], pooling=PoolingType.SUM) for t in tables]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    torch.manual_seed(cfg.train.seed)
    return DLRM(embedding_bag_collection=ebc, dense_in_features=len(cfg.schema.dense),
                dense_arch_layer_sizes=list(cfg.model.bottom_mlp),
                over_arch_layer_sizes=[*cfg.model.top_mlp, 1], dense_device=torch.device("cpu"))


def sharder(cfg, kinds: list[str]):
    """EmbeddingBagCollectionSharder allowing ``kinds`` on CPU (stock TorchRec refuses row-wise there)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    class CpuSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            return list(kinds)

    return CpuSharder(fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD,
                                    "learning_rate": cfg.optimizer.sparse_lr, "eps": cfg.optimizer.eps})


def per_table(plan) -> dict:
    """distrec's ShardingPlan as TorchRec parameter generators, table by table."""
    from torchrec.distributed import sharding_plan as sp

    out = {}
    for name, tp in plan.tables.items():
        kind, ranks = tp.sharding_type.value, sorted({s.rank for s in tp.shards})
        if kind == "table_wise":
            out[name] = sp.table_wise(rank=ranks[0], compute_kernel="fused")
        elif kind == "row_wise":
            out[name] = sp.row_wise(compute_kernel="fused")
        elif kind == "data_parallel":
            out[name] = sp.data_parallel()
        elif kind == "column_wise":
            out[name] = sp.column_wise(ranks=[s.rank for s in tp.shards], compute_kernel="fused")
        else:
            raise SystemExit(f"distrec bench: error: TorchRec peer cannot place {name} as {kind}")
    return out


def build(cfg, tables, plan, world: int):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    model = torchrec_model(tables, cfg)
    tables_plan = per_table(plan)
    kinds = sorted({tp.sharding_type.value for tp in plan.tables.values()})
    shd = sharder(cfg, kinds)
    module_plan = construct_module_sharding_plan(model.sparse_arch.embedding_bag_collection, tables_plan,
                                                 sharder=shd, local_size=world, world_size=world, device_type="cpu")
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan({EBC: module_plan}), sharders=[shd])


class Optimizers:
    """The dense optimizer, and Adagrad at the sparse lr for data-parallel tables (not fused by TorchRec;
    distrec updates its replicas with the sparse optimizer too)."""

    def __init__(self, cfg, dmp):
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        named = list(in_backward_optimizer_filter(dmp.named_parameters()))
        tables = [p for n, p in named if "embedding_bags" in n]
        dense = [p for n, p in named if "embedding_bags" not in n]
        kind = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[cfg.optimizer.dense]
        self.opts = [kind(dense, lr=cfg.optimizer.dense_lr)]
        if tables:
            self.opts.append(torch.optim.Adagrad(tables, lr=cfg.optimizer.sparse_lr, eps=cfg.optimizer.eps))

    def step(self) -> None:
        for opt in self.opts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=set_to_none)


def forward(cfg, dmp, batch) -> torch.Tensor:
    """fp32 logits [batch]; the model under bf16 autocast when the config trains in bf16."""
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ValueError(f"the TorchRec peer runs fp32 or bf16, not train.precision = {cfg.train.precision!r}")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
        return dmp(batch.dense, batch.sparse.to_kjt()).squeeze(1).float()


def train(cfg, dmp, opt, loader, steps: int) -> float:
    """Seconds for ``steps`` global batches (data wait included, as in distrec.train's samples/s)."""
    dist.barrier()
    start, done = time.perf_counter(), 0
    while done < steps:
        for batch in loader.epoch(done // max(loader.num_batches(), 1)):
            logits = forward(cfg, dmp, batch)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
            loss.backward()  # the fused kernel updates the embedding rows during backward
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done >= steps:
                break
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(cfg, dmp, loader, ctx) -> dict:
    from distrec.trainer.metrics import auc, gather_predictions, logloss

    dmp.eval()
    probs, labels = [], []
    for batch in loader.epoch(0):
        probs.append(torch.sigmoid(forward(cfg, dmp, batch)))
        labels.append(batch.labels)
    p, y = gather_predictions(torch.cat(probs), torch.cat(labels), ctx)
    return {"auc": auc(p, y), "logloss": logloss(p, y), "rows": int(y.size)}


def run(cfg, strategy: str, result_path: str) -> None:
    from distrec.config import table_specs
    from distrec.data.manifest import read_manifest
    from distrec.trainer.dist import DistContext, all_gather_object
    from distrec.data.loader import make_loader
    from sharding.files import atomic_write
    from sharding.plan import load_plan
    from sharding.planner import simple_plan
    from sharding.types import TableConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "gloo")
    manifest = read_manifest(cfg.data.path)
    tables = [TableConfig(s.name, s.num_rows, s.dim, s.pooling, s.init, s.init_std) for s in table_specs(cfg, manifest.get("cardinalities"))]
    plan = load_plan(strategy, tables, world) if strategy.endswith(".json") else simple_plan(tables, world, strategy)
    dmp = build(cfg, tables, plan, world)
    opt = Optimizers(cfg, dmp)
    seconds = train(cfg, dmp, opt, make_loader(cfg, manifest, cfg.data.train_split, ctx, True), cfg.train.max_steps)
    metrics = evaluate(cfg, dmp, make_loader(cfg, manifest, cfg.data.eval_split, ctx, False), ctx)
    per_rank = all_gather_object([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], ctx)
    if rank == 0:
        slowest = max(s for s, _ in per_rank)
        result = {**metrics, "samples_per_s": cfg.train.max_steps * cfg.train.global_batch_size / slowest,
                  "train_seconds": slowest, "peak_rss_bytes": [m for _, m in per_rank]}
        atomic_write(result_path, json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    from distrec.config import load_config

    p = argparse.ArgumentParser(prog="distrec.tools.bench.torchrec_run", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--strategy", required=True, help="table_wise | row_wise | data_parallel | PLAN.json")
    p.add_argument("--result", required=True)
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run(cfg, args.strategy, args.result)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # TorchRec's teardown may abort after the work is done; the result is already written


if __name__ == "__main__":
    sys.exit(main())
