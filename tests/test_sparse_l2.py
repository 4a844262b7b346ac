"""optimizer.sparse_l2: the L2 penalty on the rows a batch touches, once per row per step (sharding.optim),
held against the update written out by hand here, for every optimizer kind and kernel, on 1 rank and on
2 gloo ranks (row-wise and data-parallel tables) = one process."""
import pytest
import torch

from sharding.init import init_rows
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec, SparseOptimizer
from sharding.planner import simple_plan
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import TableConfig
from tests.ranks import run_ranks
from tests.tolerance import assert_within, sum_tol

KINDS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
LR, L2, EPS, BETAS = 0.1, 0.5, 1e-8, (0.9, 0.999)
# t0 row-wise (rows 0-5 on rank 0, 6-11 on rank 1 with 2 ranks), t1 replicated on every rank.
TABLES = [TableConfig("t0", 12, 4), TableConfig("t1", 6, 4)]
PLAN = {"t0": "row_wise", "t1": "data_parallel"}
# 4 samples; rank 0 takes samples 0-1, rank 1 samples 2-3. t0's row 3 occurs 3 times over both ranks'
# samples (per row, not per occurrence: it gets l2 * w once); row 9 lives on rank 1 but is used by
# rank 0's sample; t1's row 2 is used on both ranks (the replicas must add the penalty once, not twice).
# Sample 1's upstream gradient is 0: its rows are touched with a zero gradient and still get the penalty.
BAGS = {"t0": [[3, 3, 9], [7], [], [3, 0]], "t1": [[2], [5], [2, 1], [1]]}
UPSTREAM = torch.tensor([[0.5, -1.0, 2.0, 0.25, 1.0, 1.0, -0.5, 0.0],
                         [0.0] * 8,
                         [1.5, 0.5, -0.5, 1.0, -2.0, 0.75, 0.5, 1.0],
                         [-1.0, 0.25, 0.5, -0.75, 0.5, -1.0, 1.5, 2.0]])


def batch(lo: int, hi: int) -> JaggedBatch:
    lengths = [len(BAGS[t.name][b]) for t in TABLES for b in range(lo, hi)]
    ids = [i for t in TABLES for b in range(lo, hi) for i in BAGS[t.name][b]]
    return JaggedBatch([t.name for t in TABLES], torch.tensor(ids, dtype=torch.int64),
                       torch.tensor(lengths, dtype=torch.int64))


def by_hand(kind: str) -> list[torch.Tensor]:
    """One step, written out: G[r] = sum over r's occurrences of the upstream gradient; for each row
    with an id in the batch g = G[r] + L2 * w[r] (once), then the optimizer's rule; other rows unchanged."""
    out, col = [], 0
    for i, t in enumerate(TABLES):
        w = init_rows(0, i, t.num_rows, t.dim, (0, t.num_rows), (0, t.dim))
        new = w.clone()
        touched = sorted({r for bag in BAGS[t.name] for r in bag})
        for r in touched:
            G = sum(UPSTREAM[b, col:col + t.dim] for b, bag in enumerate(BAGS[t.name]) for x in bag if x == r)
            g = G + L2 * w[r]
            if kind == "sgd":
                new[r] = w[r] - LR * g
            elif kind == "adagrad":
                new[r] = w[r] - LR * g / ((g * g).sqrt() + EPS)
            elif kind == "rowwise_adagrad":
                new[r] = w[r] - LR * g / ((g * g).mean().sqrt() + EPS)
            else:  # Adam's first step: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected
                m, v = (1 - BETAS[0]) * g, (1 - BETAS[1]) * g * g
                new[r] = w[r] - LR * (1 - BETAS[1]) ** 0.5 / (1 - BETAS[0]) * m / (v.sqrt() + EPS)
        out.append(new)
        col += t.dim
    return out


def tolerance(want: torch.Tensor, table: int) -> torch.Tensor:
    """A row's gradient sums <= 3 occurrences plus the L2 term, then the rule takes <= 8 elementwise ops:
    12 roundings, each of a value no larger than |w| + |update| + LR (LR bounds the Adagrads' and Adam's
    first update relative to |g|), so sum_tol over 12 terms of that holds any order of them."""
    t = TABLES[table]
    w = init_rows(0, table, t.num_rows, t.dim, (0, t.num_rows), (0, t.dim))
    return sum_tol(w.abs() + (want - w).abs() + LR, 12)


def test_sparse_optimizer_adds_l2_once_per_touched_row_per_step():
    for kind in KINDS:
        weights = [torch.nn.Parameter(init_rows(0, i, t.num_rows, t.dim, (0, t.num_rows), (0, t.dim)))
                   for i, t in enumerate(TABLES)]
        opt = SparseOptimizer(weights, kind, lr=LR, eps=EPS, betas=BETAS, l2=L2)
        jb = batch(0, 4)
        pooled = []
        for i, (t, w) in enumerate(zip(TABLES, weights)):
            ids = torch.tensor([x for bag in BAGS[t.name] for x in bag])
            offsets = torch.tensor([0] + [len(b) for b in BAGS[t.name]]).cumsum(0)[:-1]
            pooled.append(torch.nn.functional.embedding_bag(ids, w, offsets, mode="sum", sparse=True))
        (torch.cat(pooled, 1) * UPSTREAM).sum().backward()
        opt.step()
        for i, (got, want) in enumerate(zip(weights, by_hand(kind))):
            assert_within(got.detach(), want, tolerance(want, i), f"{kind} table {i}")
        assert jb.batch_size == 4


def sharded_rank(rank: int, world: int, combos) -> dict:
    lo, hi = 4 * rank // world, 4 * (rank + 1) // world
    out = {}
    for kind, kernel in combos:
        emb = ShardedEmbeddingCollection(TABLES, simple_plan(TABLES, world, "row_wise", PLAN), rank=rank, seed=0,
                                         optim=OptimSpec(kind, LR, EPS, BETAS, l2=L2), kernel=kernel)
        assert emb.kernel == kernel
        (emb(batch(lo, hi)) * UPSTREAM[lo:hi]).sum().backward()
        emb.sync_replica_grads()
        emb.step()
        out[kind, kernel] = [(name, s, w.clone()) for name, s, w in emb.shard_weights()]
    return out


COMBOS = [(k, "torch") for k in KINDS] + [(k, "cpu") for k in KINDS] + [(k, "triton") for k in KINDS]


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_l2_equals_the_hand_formula(world, monkeypatch):
    # The spawned ranks run Triton on CPU: its interpreter, which each must see from its start (imports
    # made while unpickling the rank function may reach triton before the function runs).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    per_rank = run_ranks(world, sharded_rank, COMBOS)
    names = [t.name for t in TABLES]
    for combo in COMBOS:
        want = by_hand(combo[0])
        got = [torch.full_like(w, float("nan")) for w in want]
        for result in per_rank:
            for name, s, w in result[combo]:
                i = names.index(name)
                if name == "t1":  # every rank's replica must be the single-process table
                    assert_within(w, want[i], tolerance(want[i], i), f"{combo} rank replica")
                got[i][s.row_start:s.row_end, s.col_start:s.col_end] = w
        for i, (g, w) in enumerate(zip(got, want)):
            assert_within(g, w, tolerance(w, i), f"{combo} world {world} table {names[i]}")


def test_fbgemm_refuses_sparse_l2_and_auto_picks_the_cpu_kernel_or_torch(monkeypatch):
    plan = simple_plan(TABLES, 1, "row_wise", PLAN)
    with pytest.raises(ValueError, match="optimizer.sparse_l2 is not supported by kernel fbgemm"):
        ShardedEmbeddingCollection(TABLES, plan, optim=OptimSpec("adagrad", LR, l2=L2), kernel="fbgemm")
    auto = ShardedEmbeddingCollection(TABLES, plan, optim=OptimSpec("adagrad", LR, l2=L2), kernel="auto")
    assert auto.kernel == "cpu"  # distrec's CPU kernel has the L2
    # Without it (not built), auto skips fbgemm for the L2 and takes torch; without the penalty, fbgemm.
    from sharding.kernels import cpu_tbe

    monkeypatch.setattr(cpu_tbe, "load", lambda: (None, "ImportError: not built"))
    auto = ShardedEmbeddingCollection(TABLES, plan, optim=OptimSpec("adagrad", LR, l2=L2), kernel="auto")
    assert auto.kernel == "torch" and "sparse_l2" in auto.kernel_reason and "not cpu:" in auto.kernel_reason
    assert ShardedEmbeddingCollection(TABLES, plan, optim=OptimSpec("adagrad", LR)).kernel == "fbgemm"


@pytest.mark.parametrize("kernel", ["torch", "cpu", "fbgemm"])
def test_set_lr_changes_the_next_update(kernel):
    """The schedule's hook: after set_lr(lr / 4) an SGD step moves each row by a quarter as much."""
    plan = simple_plan(TABLES, 1, "row_wise")
    moves = []
    for lr in (LR, LR / 4):
        emb = ShardedEmbeddingCollection(TABLES, plan, optim=OptimSpec("sgd", LR), kernel=kernel)
        assert emb.kernel == kernel
        emb.set_lr(lr)
        before = [w.clone() for _, _, w in emb.shard_weights()]
        (emb(batch(0, 4)) * UPSTREAM).sum().backward()
        emb.step()
        moves.append([w - b for (_, _, w), b in zip(emb.shard_weights(), before)])
    for full, quarter in zip(*moves):
        assert quarter.abs().max() > 0
        assert_within(quarter, full / 4, sum_tol(full.abs() / 4 + 1.0, 4), f"{kernel} lr / 4")
