"""Dynamic (hash-keyed) tables, sharding.dynamic: with every id admitted they train exactly as a static
table whose row r is the r-th distinct id seen, on 1 and 2 gloo ranks and for every fused optimizer;
admission, each eviction policy, a full shard, bad input, and the per-rank state (round trip, 2 -> 3)."""
import pytest
import torch
import torch.nn.functional as F

from sharding.dynamic import DynamicEmbeddingCollection, HashShard, init_rows_for_ids, owner_of
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec, SparseOptimizer
from sharding.runtime import InputError
from sharding.types import DynamicTableConfig
from tests.ranks import run_ranks
from tests.tolerance import assert_within, sum_tol

TABLES = [DynamicTableConfig("u", 4, capacity=64, init_bound=0.1),
          DynamicTableConfig("v", 3, capacity=64, pooling="mean", init="normal", init_std=0.1)]
KINDS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
GLOBAL_BATCH, STEPS, LR, MAX_LEN = 12, 4, 0.1, 4
# Raw ids: negative, zero, the int64 extremes and random 62-bit values.
POOL = torch.cat([torch.tensor([-1, 0, 1, 2**63 - 1, -2**63]),
                  torch.randint(-2**62, 2**62, (35,), generator=torch.Generator().manual_seed(7))])


def global_batch(step):
    """Per table: lengths [GLOBAL_BATCH] and ids (raw), and the upstream gradient [GLOBAL_BATCH, dims]."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(0, MAX_LEN + 1, (len(TABLES), GLOBAL_BATCH), generator=g)  # 0: empty bags
    ids = [POOL[torch.randint(0, len(POOL), (int(n.sum()),), generator=g)] for n in lengths]
    upstream = torch.randn(GLOBAL_BATCH, sum(t.dim for t in TABLES), generator=g)
    return lengths, ids, upstream


def batch_of(lengths, ids, lo, hi):
    """Samples [lo, hi) of the global batch as a JaggedBatch."""
    values = [v[int(n[:lo].sum()):int(n[:hi].sum())] for n, v in zip(lengths, ids)]
    return JaggedBatch([t.name for t in TABLES], torch.cat(values), lengths[:, lo:hi].reshape(-1))


def bounds(rank, world):
    return GLOBAL_BATCH * rank // world, GLOBAL_BATCH * (rank + 1) // world


def static_reference(kind):
    """A static table per dynamic one: row r is the r-th distinct id in first-seen order, initialised as
    the dynamic row of that id, looked up by F.embedding_bag and updated by SparseOptimizer. Returns the
    pooled outputs per step, the orders, the final rows, and per table the tolerance of its rows."""
    batches = [global_batch(s) for s in range(STEPS)]
    order = [first_seen(torch.cat([b[1][t] for b in batches])) for t in range(len(TABLES))]
    weights = [torch.nn.Parameter(init_rows_for_ids(0, t, order[t], tab)) for t, tab in enumerate(TABLES)]
    opt = SparseOptimizer(weights, kind, LR)
    pooled_steps, moved, worst = [], [torch.zeros_like(w) for w in weights], 0.0
    for lengths, ids, upstream in batches:
        pooled = reference_pool(weights, order, lengths, ids)
        pooled_steps.append(pooled.detach())
        grads = torch.autograd.grad((pooled * upstream).sum(), weights, retain_graph=True)
        # The loss is linear in the weights, so each element's gradient is the same float32 sum of the
        # same terms on any number of ranks, in another order: it differs by <= sum_tol(sum |terms|, n).
        magnitudes = torch.autograd.grad((pooled * upstream.abs()).sum(), weights)
        terms = max(int(torch.bincount(row_of(order[t], ids[t])).max()) for t in range(len(TABLES)))
        for g, m in zip(grads, magnitudes):
            touched = m > 0
            worst = max(worst, float((sum_tol(m[touched], terms) / g[touched].abs()).max()))
        before = [w.detach().clone() for w in weights]
        for w, g in zip(weights, grads):
            w.grad = g
        opt.step()
        opt.zero_grad()
        for m, w, b in zip(moved, weights, before):
            m += (w.detach() - b).abs()
    # worst: the largest relative error of one gradient element. Every rule's update is homogeneous in g
    # (sgd: degree 1; adagrad, row-wise adagrad, adam: degree 0, a ratio of g-built numerator and
    # denominator, each off by <= worst relatively), so a step's move is off by <= 2 * worst of itself, to
    # first order, and a row element by <= 2 * worst * (the sum of its moves).
    return pooled_steps, order, [w.detach() for w in weights], moved, [2 * worst * m for m in moved]


def reference_pool(weights, order, lengths, ids):
    pieces = []
    for t, tab in enumerate(TABLES):
        out = F.embedding_bag(row_of(order[t], ids[t]), weights[t], torch.cumsum(lengths[t], 0) - lengths[t],
                              mode="sum")
        pieces.append(out / lengths[t].clamp(min=1)[:, None] if tab.pooling == "mean" else out)
    return torch.cat(pieces, 1)


def pooled_tol(weights, moved, tols, order, lengths, ids):
    """A pooled value sums <= MAX_LEN rows, each off by its row tolerance (at any step: the tolerances
    only grow) and of magnitude <= |final row| + its moves: the rows' error, plus a sum's rounding."""
    absw = reference_pool([w.abs() + m for w, m in zip(weights, moved)], order, lengths, ids)
    return reference_pool(tols, order, lengths, ids) + sum_tol(absw, MAX_LEN)


def first_seen(ids):
    distinct, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((distinct.numel(),), ids.numel()).scatter_reduce(0, inverse, torch.arange(ids.numel()), "amin")
    return distinct[torch.argsort(first)]


def row_of(order, ids):
    sorted_ids, perm = torch.sort(order)
    return perm[torch.searchsorted(sorted_ids, ids)]


def dynamic_rank(rank, world, kinds):
    out = {}
    for kind in kinds:
        emb = DynamicEmbeddingCollection(TABLES, rank=rank, seed=0, optim=OptimSpec(kind, LR))
        lo, hi = bounds(rank, world)
        pooled_steps = []
        for step in range(STEPS):
            lengths, ids, upstream = global_batch(step)
            pooled = emb(batch_of(lengths, ids, lo, hi))
            pooled_steps.append(pooled.detach())
            (pooled * upstream[lo:hi]).sum().backward()
            emb.step(step + 1)
        out[kind] = (pooled_steps, emb.state(), emb.stats())
    return out


def check_against_reference(per_rank, kind):
    want_pooled, order, want_rows, moved, tols = static_reference(kind)
    for step in range(STEPS):
        lengths, ids, _ = global_batch(step)
        got = torch.cat([r[kind][0][step] for r in per_rank])
        assert_within(got, want_pooled[step], pooled_tol(want_rows, moved, tols, order, lengths, ids),
                      f"{kind}: pooled, step {step}")
    for t, tab in enumerate(TABLES):
        ids = torch.cat([r[kind][1][tab.name]["ids"] for r in per_rank])
        assert sorted(ids.tolist()) == sorted(order[t].tolist()), f"{kind}: table {tab.name}: ids with rows"
        rows = torch.cat([r[kind][1][tab.name]["rows"] for r in per_rank])
        at = row_of(order[t], ids)
        assert_within(rows, want_rows[t][at], tols[t][at], f"{kind}: table {tab.name}: rows")
        assert all(r[kind][2][tab.name]["rejected"] == 0 for r in per_rank)


def test_all_admitted_trains_as_a_static_table_on_one_rank():
    per_rank = [dynamic_rank(0, 1, KINDS)]
    for kind in KINDS:
        check_against_reference(per_rank, kind)


def test_all_admitted_trains_as_a_static_table_on_two_ranks():
    per_rank = run_ranks(2, dynamic_rank, KINDS)
    for r, result in enumerate(per_rank):  # every id lives on its owner
        for state in result["sgd"][1].values():
            assert bool((owner_of(state["ids"], 2) == r).all())
    for kind in KINDS:
        check_against_reference(per_rank, kind)


def one_table(**kw):
    return DynamicTableConfig("t", 2, **{"capacity": 8, **kw})


def train(shard, ids, step, lengths=None):
    """One training step of a lone shard: pool ``ids`` (one bag each unless ``lengths``), loss = sum."""
    lengths = torch.ones(len(ids), dtype=torch.int64) if lengths is None else torch.tensor(lengths)
    out = shard.pool(torch.tensor(ids), lengths, train=True)
    out.sum().backward()
    shard.step(step)
    return out.detach()


def test_admission_waits_for_admit_count_occurrences():
    shard = HashShard(one_table(admit_count=3), 0, seed=0, optim=OptimSpec("sgd", 0.1))
    out = train(shard, [5, 5, -9], step=1)  # 5 seen twice, -9 once: neither admitted
    assert torch.equal(out, torch.zeros(3, 2)) and shard.stats()["occupancy"] == 0
    out = train(shard, [-9], step=2)  # -9: 2 < 3, still zeros and no row
    assert torch.equal(out, torch.zeros(1, 2)) and shard.find(torch.tensor([-9])).item() == -1
    out = train(shard, [5, 7], step=3)  # 5's third occurrence: admitted, looked up and updated now
    assert torch.equal(out[1], torch.zeros(2)) and not torch.equal(out[0], torch.zeros(2))
    state = shard.state()
    assert state["ids"].tolist() == [5] and state["counts"].tolist() == [1]
    want = init_rows_for_ids(0, 0, torch.tensor([5]), one_table()) - 0.1  # one sgd step of gradient 1
    torch.testing.assert_close(state["rows"], want)
    assert shard.stats() == {"admitted": 1, "evicted": 0, "rejected": 0, "occupancy": 1, "capacity": 8}


def test_the_sketch_only_over_counts():
    shard = HashShard(one_table(admit_count=2), 0, seed=0, optim=None)
    ids = torch.arange(-5000, 5000) * 7919  # many distinct ids, each once: with collisions some estimate > 1
    est = shard.sketch.add(ids, torch.ones_like(ids))
    assert bool((est >= 1).all())


def fill(evict, capacity=3, **kw):
    """A shard holding ids 10, 11, 12 (slots 0-2) after steps 1-3: 10 seen at steps 1 and 3 (count 2),
    11 at step 1, 12 at step 2 (count 3)."""
    shard = HashShard(one_table(capacity=capacity, evict=evict, **kw), 0, seed=0, optim=OptimSpec("adagrad", 0.1))
    train(shard, [10, 11], 1)
    train(shard, [12, 12, 12], 2)
    train(shard, [10], 3)
    return shard


def test_lru_evicts_the_least_recently_seen_and_frees_its_state():
    shard = fill("lru")
    slot = int(shard.find(torch.tensor([11])))
    assert float(shard.optimizer.state[shard.weight]["sum"][slot].sum()) > 0
    train(shard, [12, 99], 4)  # full: 11 (last seen at step 1) goes, 12 is in this batch anyway
    assert shard.state()["ids"].tolist() == [10, 12, 99]
    assert int(shard.find(torch.tensor([99]))) == slot  # 11's slot, reused with fresh state:
    assert float(shard.optimizer.state[shard.weight]["sum"][slot].sum()) == pytest.approx(2 * 1.0)  # one step
    assert shard.stats()["evicted"] == 1 and shard.stats()["admitted"] == 4


def test_lfu_evicts_the_least_counted():
    shard = fill("lfu")  # counts: 10 -> 2, 11 -> 1, 12 -> 3
    train(shard, [98, 99], 4)  # two new ids: 11, then 10
    assert shard.state()["ids"].tolist() == [12, 98, 99] and shard.stats()["evicted"] == 2


def test_ids_of_the_current_batch_are_never_evicted():
    shard = fill("lru")
    train(shard, [10, 11, 12, 99], 4)  # all three held ids are in the batch: 99 finds no room
    assert shard.state()["ids"].tolist() == [10, 11, 12] and shard.stats()["rejected"] == 1


def test_steps_to_live_evicts_ids_not_seen_for_more_than_n_steps():
    shard = fill("steps_to_live", steps_to_live=1)  # last seen: 10 -> 3, 11 -> 1, 12 -> 2
    assert shard.evict(3) == 1 and shard.state()["ids"].tolist() == [10, 12]  # 3 - 1 > 1
    assert shard.evict(4) == 1 and shard.state()["ids"].tolist() == [10]
    assert shard.stats()["evicted"] == 2 and shard.stats()["occupancy"] == 1
    assert float(shard.optimizer.state[shard.weight]["sum"].sum()) == pytest.approx(2 * 2.0)  # 10's only


def test_l2_evicts_rows_whose_norm_is_below_the_threshold():
    shard = fill("l2", l2_threshold=1.0)
    shard.weight.data[int(shard.find(torch.tensor([11])))] = torch.tensor([3.0, 4.0])  # norm 5: kept
    assert shard.evict(5) == 2 and shard.state()["ids"].tolist() == [11]


def test_a_full_shard_without_eviction_rejects_and_counts():
    for evict in ["none", "steps_to_live", "l2"]:
        kw = {"steps_to_live": 5} if evict == "steps_to_live" else {"l2_threshold": 0.1} if evict == "l2" else {}
        shard = fill(evict, **kw)
        out = train(shard, [50, 51, 10], 4)
        assert torch.equal(out[:2], torch.zeros(2, 2)) and shard.state()["ids"].tolist() == [10, 11, 12]
        assert shard.stats()["rejected"] == 2 and shard.stats()["evicted"] == 0


def test_bad_configs_and_input_name_the_table():
    with pytest.raises(ValueError, match="^dynamic table t: capacity 0 must be >= 1"):
        one_table(capacity=0)
    with pytest.raises(ValueError, match="^dynamic table t: evict 'fifo' must be one of"):
        one_table(evict="fifo")
    with pytest.raises(ValueError, match="^dynamic table t: admit_count 0"):
        one_table(admit_count=0)
    emb = DynamicEmbeddingCollection(TABLES, seed=0)
    floats = JaggedBatch(["u", "v"], torch.tensor([1.5, 2.0]), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(InputError, match=r"^rank 0: dynamic table v: ids must be int64 \(raw ids\), got torch.float32$"):
        emb(floats)
    weighted = JaggedBatch(["u", "v"], torch.tensor([1, 2]), torch.tensor([1, 1]), torch.ones(2))
    with pytest.raises(InputError, match="per-sample weights are not supported yet"):
        emb(weighted)
    with pytest.raises(InputError, match="keys do not match"):
        emb(JaggedBatch(["v", "u"], torch.tensor([1, 2]), torch.tensor([1, 1])))


def test_eval_forward_admits_nothing():
    emb = DynamicEmbeddingCollection(TABLES, seed=0).eval()
    lengths, ids, _ = global_batch(0)
    assert torch.equal(emb(batch_of(lengths, ids, 0, GLOBAL_BATCH)), torch.zeros(GLOBAL_BATCH, 7))
    assert emb.stats()["u"]["occupancy"] == 0


def trained_state(rank, world, load=None):
    """Train 2 steps (adam) on ``world`` ranks, or load ``load`` (all old ranks' states) first; the state."""
    emb = DynamicEmbeddingCollection(TABLES, rank=rank, seed=0, optim=OptimSpec("adam", LR))
    if load is not None:
        emb.load_state(load)
        return emb.state()
    lo, hi = bounds(rank, world)
    for step in range(2):
        lengths, ids, upstream = global_batch(step)
        (emb(batch_of(lengths, ids, lo, hi)) * upstream[lo:hi]).sum().backward()
        emb.step(step + 1)
    return emb.state()


def triples(states):
    """{(table, id): (row, optimizer state, count, last step)} over all ranks' states."""
    out = {}
    for s in states:
        for name, t in s.items():
            for i, x in enumerate(t["ids"].tolist()):
                out[name, x] = (t["rows"][i].tolist(), {k: v[i].tolist() for k, v in t["optim"].items()},
                                int(t["counts"][i]), int(t["last_step"][i]))
    return out


def test_state_round_trip_on_one_rank():
    state = trained_state(0, 1)
    again = trained_state(0, 1, load=[state])
    assert triples([again]) == triples([state]) and float(again["u"]["optim_scalars"]["step"]) == 2


def two_then_three(rank, world, old):
    emb = DynamicEmbeddingCollection(TABLES, rank=rank, seed=0, optim=OptimSpec("adam", LR))
    emb.load_state(old)
    return emb.state()


def test_state_round_trip_on_two_ranks_and_resharding_to_three():
    old = run_ranks(2, trained_state)
    assert triples(run_ranks(2, two_then_three, old)) == triples(old)
    new = run_ranks(3, two_then_three, old)
    assert triples(new) == triples(old)
    for r, s in enumerate(new):
        assert all(bool((owner_of(t["ids"], 3) == r).all()) for t in s.values())
