"""The sharded runtime on 1-4 real gloo ranks against a plain single-process model: pooled outputs and
updated tables, for every sharding type mixed in one plan, every fused optimizer, and both lookup
kernels (plain PyTorch; distrec's CPU kernel and fbgemm's table-batched op, with the optimizer fused into
backward)."""
import warnings

import pytest
import torch
from torch import nn

from sharding.init import init_rows
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec, SparseOptimizer
from sharding.planner import simple_plan
from sharding.runtime import InputError, ShardedEmbeddingCollection
from sharding.types import Shard, TableConfig, TablePlan
from tests.ranks import run_ranks

# t3 is 6 wide, so its column shards are uneven (and fbgemm, which needs widths in multiples of 4,
# cannot take it): the fbgemm runs widen it to 8 and cut it into two 4-wide shards by hand.
TABLES = [TableConfig("t0", 40, 8), TableConfig("t1", 7, 8, "mean"), TableConfig("t2", 100, 8),
          TableConfig("t3", 25, 6), TableConfig("t4", 60, 8, "mean")]
FBGEMM_TABLES = [t if t.name != "t3" else TableConfig("t3", 25, 8) for t in TABLES]
MIXED = {"t0": "row_wise", "t1": "data_parallel", "t2": "table_wise", "t3": "column_wise", "t4": "row_wise"}
GLOBAL_BATCH, STEPS, LR = 23, 3, 0.1
KINDS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
FBGEMM_KINDS = ["sgd", "adagrad", "rowwise_adagrad"]  # fbgemm's CPU op has no Adam
COMBOS = [(k, "torch") for k in KINDS] + [(k, "cpu") for k in KINDS] + [(k, "fbgemm") for k in FBGEMM_KINDS]


def tables_for(kernel):
    return FBGEMM_TABLES if kernel == "fbgemm" else TABLES


def make_plan(world, kind, kernel):
    # Row-wise Adagrad keeps one accumulator per row of each shard, so a column-wise table's update
    # differs from the unsharded one by design (as in TorchRec): hold that table table-wise for it.
    mixed = {**MIXED, "t3": "table_wise"} if kind == "rowwise_adagrad" else MIXED
    plan = simple_plan(tables_for(kernel), world, "table_wise", mixed)
    if kernel == "fbgemm" and mixed["t3"] == "column_wise":
        plan.tables["t3"] = TablePlan("t3", plan.tables["t3"].sharding_type,
                                      [Shard(0, 0, 25, 0, 4), Shard(world - 1, 0, 25, 4, 8)])
    return plan


def make_batch(step, tables=TABLES):
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(0, 5, (len(tables), GLOBAL_BATCH), generator=g)  # 0: empty bags
    values = [torch.randint(0, t.num_rows, (int(lengths[i].sum()),), generator=g) for i, t in enumerate(tables)]
    weights = torch.rand(int(lengths.sum()), generator=g)
    upstream = torch.randn(GLOBAL_BATCH, sum(t.dim for t in tables), generator=g)
    return JaggedBatch([t.name for t in tables], torch.cat(values), lengths.reshape(-1), weights), upstream


def local_slice(jb, lo, hi):
    lengths = jb.lengths.view(len(jb.keys), -1)
    starts = torch.cumsum(jb.lengths, 0) - jb.lengths
    keep_ids = torch.cat([torch.arange(int(starts.view(len(jb.keys), -1)[t, lo]),
                                       int(starts.view(len(jb.keys), -1)[t, lo]) + int(lengths[t, lo:hi].sum()))
                          for t in range(len(jb.keys))])
    return JaggedBatch(jb.keys, jb.values[keep_ids], lengths[:, lo:hi].reshape(-1), jb.weights[keep_ids])


def bounds(rank, world):
    return GLOBAL_BATCH * rank // world, GLOBAL_BATCH * (rank + 1) // world


class Plain(nn.Module):
    """One nn.EmbeddingBag per table, a Python loop: the reference."""

    def __init__(self, tables=TABLES):
        super().__init__()
        self.tables = tables
        self.bags = nn.ModuleList(nn.EmbeddingBag(t.num_rows, t.dim, mode="sum", sparse=True) for t in tables)
        for i, (t, bag) in enumerate(zip(tables, self.bags)):
            bag.weight.data.copy_(init_rows(0, i, t.num_rows, t.dim, (0, t.num_rows), (0, t.dim)))

    def forward(self, jb):
        out, pos = [], 0
        lengths = jb.lengths.view(len(self.tables), -1)
        for t, bag, n in zip(self.tables, self.bags, lengths):
            ids, w = jb.values[pos:pos + int(n.sum())], jb.weights[pos:pos + int(n.sum())]
            pos += int(n.sum())
            pooled = bag(ids, torch.cumsum(n, 0) - n, per_sample_weights=w)
            out.append(pooled / n.clamp(min=1)[:, None] if t.pooling == "mean" else pooled)
        return torch.cat(out, 1)


def reference_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=LR, eps=1e-8)
    if kind == "adam":
        return torch.optim.SparseAdam(params, lr=LR, eps=1e-8)
    return SparseOptimizer(params, "rowwise_adagrad", lr=LR)  # checked against a plain loop in test_sparse_optim


def reference(kind, tables):
    model = Plain(tables)
    opt = reference_optimizer(kind, list(model.parameters()))
    first = None
    for step in range(STEPS):
        jb, upstream = make_batch(step, tables)
        pooled = model(jb)
        first = pooled.detach() if first is None else first
        (pooled * upstream).sum().backward()
        opt.step()
        opt.zero_grad()
    return first, [bag.weight.detach() for bag in model.bags]


def sharded_rank(rank, world, combos):
    results = {}
    for kind, kernel in combos:
        tables = tables_for(kernel)
        emb = ShardedEmbeddingCollection(tables, make_plan(world, kind, kernel), rank=rank, seed=0,
                                         optim=OptimSpec(kind, LR), kernel=kernel)
        assert emb.kernel == kernel
        lo, hi = bounds(rank, world)
        first = None
        for step in range(STEPS):
            jb, upstream = make_batch(step, tables)
            pooled = emb(local_slice(jb, lo, hi))
            first = pooled.detach() if first is None else first
            (pooled * upstream[lo:hi]).sum().backward()
            emb.sync_replica_grads()
            emb.step()
        results[kind, kernel] = (first, [(name, s, w.clone()) for name, s, w in emb.shard_weights()])
    return results


def assemble(per_rank, combo):
    tables = [torch.full((t.num_rows, t.dim), float("nan")) for t in tables_for(combo[1])]
    names = [t.name for t in tables_for(combo[1])]
    for result in per_rank:
        for name, s, w in result[combo][1]:
            tables[names.index(name)][s.row_start:s.row_end, s.col_start:s.col_end] = w
    return tables


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mixed_plan_matches_single_process_for_every_optimizer(world):
    per_rank = run_ranks(world, sharded_rank, COMBOS)
    for combo in COMBOS:
        want_pooled, want_tables = reference(combo[0], tables_for(combo[1]))
        got_pooled = torch.cat([r[combo][0] for r in per_rank])
        # Same sums in another order (per rank, per shard): a pooled value sums <= 4 weighted rows of magnitude
        # <= sqrt(1 / 7) (the smallest table's init bound) and 3 steps add <= 3 updates of <= LR each, so
        # reordering moves it by ~10 * EPS32 * 0.7 ~ 1e-7 and a table element by ~3 * LR * 4 * EPS32 ~ 2e-7;
        # atol 1e-6 holds both with room, and a misplaced row or lost update (>= 1e-2) fails it.
        torch.testing.assert_close(got_pooled, want_pooled, rtol=1e-5, atol=1e-6, msg=f"{combo}: pooled")
        for t, got, want in zip(TABLES, assemble(per_rank, combo), want_tables):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{combo}: table {t.name}")
        replicas = [w for r in per_rank for name, _, w in r[combo][1] if name == "t1"]
        assert len(replicas) == world and all(torch.equal(replicas[0], w) for w in replicas)


def replica_sync_warnings(rank, world):
    """Warnings raised while data-parallel tables (t1) sum their gradients over ranks."""
    emb = ShardedEmbeddingCollection(TABLES, make_plan(world, "adagrad", "torch"), rank=rank, seed=0,
                                     optim=OptimSpec("adagrad", LR), kernel="torch")
    jb, upstream = make_batch(0, TABLES)
    lo, hi = bounds(rank, world)
    (emb(local_slice(jb, lo, hi)) * upstream[lo:hi]).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb.sync_replica_grads()
    return [str(w.message) for w in caught]


def test_replicas_sum_their_gradients_without_warnings():
    assert run_ranks(2, replica_sync_warnings) == [[], []]


def bad_input_rank(rank, world):
    plan = simple_plan(TABLES, world, "row_wise")
    emb = ShardedEmbeddingCollection(TABLES, plan, rank=rank, seed=0)
    jb, _ = make_batch(0)
    jb = local_slice(jb, *bounds(rank, world))
    if rank == 1:
        jb.values[-1] = 60  # t4 has 60 rows
    try:
        emb(jb)
    except InputError as e:
        return str(e)
    return "no error"


def test_bad_id_on_one_rank_is_raised_on_every_rank():
    messages = run_ranks(2, bad_input_rank)
    assert messages == ["rank 1: feature t4: id 60 is out of range for table t4 with 60 rows"] * 2


def test_accepts_torchrec_keyed_jagged_tensor():
    pytest.importorskip("torchrec")  # installed by `make install`; the runtime itself never needs it
    plan = simple_plan(TABLES, 1, "row_wise")
    emb = ShardedEmbeddingCollection(TABLES, plan, rank=0, seed=0)
    jb, _ = make_batch(0)
    torch.testing.assert_close(emb(jb.to_kjt()), emb(jb))
    torch.testing.assert_close(emb(jb), Plain()(jb), rtol=1e-5, atol=1e-6)
