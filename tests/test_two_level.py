"""The two-level (node-aware) output exchange on 4 real gloo ranks as 2 simulated nodes x 2 ranks: the
same outputs, row gradients and rows after optimizer steps as the flat exchange; the plan field that
selects it (JSON round trip, one-line errors); the planner choosing it when the inter-node link is the
bottleneck, and its costs following the bytes that cross nodes."""
import json

import pytest
import torch

from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec
from sharding.plan import load_plan, save_plan, validate_plan
from sharding.planner import GB, TableConstraints, Workload, estimate_plan, make_topology, plan_tables
from sharding.planner.exchange import EXCHANGE_MARGIN, output_bytes, output_seconds, with_exchange
from sharding.planner.report import format_result
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import PlanError, Shard, ShardingPlan, ShardingType, TableConfig, TablePlan
from tests.ranks import run_ranks
from tests.tolerance import assert_within, sum_tol

WORLD, PER_NODE = 4, 2
# Row shards within node 0 and node 1 (table_row_wise), row shards over both nodes (row_wise), and the
# other types beside them, so the node blocks mix partial sums with whole and column pieces.
TABLES = [TableConfig("a", 30, 8), TableConfig("b", 21, 4, "mean"), TableConfig("c", 50, 8),
          TableConfig("d", 12, 6, "mean"), TableConfig("e", 9, 4, "mean"), TableConfig("f", 5, 4)]
MAX_LEN, GLOBAL_BATCH, STEPS, LR = 4, 22, 3, 0.1


def rows(kind, t, ranks):
    block = -(-t.num_rows // len(ranks))
    return TablePlan(t.name, kind, [Shard(r, i * block, min((i + 1) * block, t.num_rows), 0, t.dim)
                                    for i, r in enumerate(ranks)])


def make_plan(exchange="flat"):
    a, b, c, d, e, f = TABLES
    tables = {"a": rows(ShardingType.TABLE_ROW_WISE, a, [0, 1]), "b": rows(ShardingType.TABLE_ROW_WISE, b, [2, 3]),
              "c": rows(ShardingType.ROW_WISE, c, [0, 1, 2, 3]),
              "d": TablePlan("d", ShardingType.COLUMN_WISE, [Shard(1, 0, 12, 0, 3), Shard(2, 0, 12, 3, 6)]),
              "e": TablePlan("e", ShardingType.TABLE_WISE, [Shard(3, 0, 9, 0, 4)]),
              "f": TablePlan("f", ShardingType.DATA_PARALLEL, [Shard(r, 0, 5, 0, 4) for r in range(WORLD)])}
    return ShardingPlan(WORLD, tables, exchange, PER_NODE if exchange == "two_level" else None)


def make_batch(step, rank):
    """This rank's batch of step ``step``: multi-hot bags (some empty) with per-sample weights."""
    lo, hi = GLOBAL_BATCH * rank // WORLD, GLOBAL_BATCH * (rank + 1) // WORLD
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, MAX_LEN + 1, (len(TABLES), hi - lo), generator=g)
    values = torch.cat([torch.randint(0, t.num_rows, (int(n.sum()),), generator=g) for t, n in zip(TABLES, lengths)])
    weights = torch.rand(values.numel(), generator=g)
    upstream = torch.randn(hi - lo, sum(t.dim for t in TABLES), generator=g)
    return JaggedBatch([t.name for t in TABLES], values, lengths.reshape(-1), weights), upstream


def run(rank, plan, optim, ranks_per_node=None):
    emb = ShardedEmbeddingCollection(TABLES, plan, rank=rank, seed=0, optim=OptimSpec(optim, LR), kernel="torch",
                                     ranks_per_node=ranks_per_node)
    outputs, grads = [], None
    for step in range(STEPS):
        jb, upstream = make_batch(step, rank)
        pooled = emb(jb)
        outputs.append(pooled.detach())
        (pooled * upstream).sum().backward()
        if grads is None:
            grads = [p.grad.coalesce().to_dense() for p in emb.local.weights]
        emb.sync_replica_grads()
        emb.step()
    return outputs, grads, [w.detach().clone() for _, _, w in emb.shard_weights()]


def both_exchanges(rank, world):
    assert world == WORLD
    out = {}
    for optim in ("sgd", "adagrad"):
        out[optim] = {"flat": run(rank, make_plan("flat"), optim),
                      "two_level": run(rank, make_plan("two_level"), optim),
                      # every rank its own node: the same code with one-rank node groups
                      "nodes_of_1": run(rank, make_plan("two_level"), optim, ranks_per_node=1)}
    return out


def test_two_level_matches_flat_outputs_gradients_and_rows():
    per_rank = run_ranks(WORLD, both_exchanges)
    for rank, result in enumerate(per_rank):
        for optim, runs in result.items():
            flat_out, flat_grads, flat_rows = runs["flat"]
            # An output element adds up at most MAX_LEN weighted rows (weights < 1) split in partial sums
            # over at most 4 row shards; the exchanges add those partials in other orders.
            biggest = max(float(w.abs().max()) for w in flat_rows)
            tol = sum_tol(MAX_LEN * biggest * 2, MAX_LEN)
            for name in ("two_level", "nodes_of_1"):
                out, grads, rows_after = runs[name]
                for step, (got, want) in enumerate(zip(out, flat_out)):
                    assert_within(got, want, tol, f"rank {rank} {optim} {name} output of step {step}")
                # The loss is linear in the output, so the gradients that come back are the same upstream
                # values, copied rather than added: gradients and rows match bit for bit.
                assert all(torch.equal(g, f) for g, f in zip(grads, flat_grads)), f"rank {rank} {name} gradients"
                assert all(torch.equal(r, f) for r, f in zip(rows_after, flat_rows)), f"rank {rank} {name} rows"


# ---- the plan field --------------------------------------------------------------------------------

def test_plan_json_round_trip_keeps_the_exchange(tmp_path):
    for exchange in ("flat", "two_level"):
        plan = make_plan(exchange)
        save_plan(tmp_path / "plan.json", plan, TABLES)
        doc = json.loads((tmp_path / "plan.json").read_text())
        assert doc["exchange"] == exchange and doc.get("ranks_per_node") == plan.ranks_per_node
        assert load_plan(tmp_path / "plan.json", TABLES, WORLD) == plan


def test_a_plan_file_without_an_exchange_loads_as_flat(tmp_path):
    save_plan(tmp_path / "plan.json", make_plan("flat"), TABLES)
    doc = json.loads((tmp_path / "plan.json").read_text())
    del doc["exchange"]
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    assert load_plan(tmp_path / "plan.json", TABLES, WORLD).exchange == "flat"


@pytest.mark.parametrize("exchange, per_node, message", [
    ("hierarchical", None, "unknown exchange 'hierarchical'; valid exchanges: flat, two_level"),
    ("two_level", None, "two_level exchange needs ranks_per_node, a whole number of ranks per node dividing "
                        "the 4 ranks, got None"),
    ("two_level", 3, "two_level exchange needs ranks_per_node, a whole number of ranks per node dividing "
                     "the 4 ranks, got 3"),
])
def test_a_bad_exchange_is_one_line_error(tmp_path, exchange, per_node, message):
    plan = make_plan("flat")
    plan.exchange, plan.ranks_per_node = exchange, per_node
    with pytest.raises(PlanError, match=message) as err:
        validate_plan(plan, TABLES, WORLD)
    assert "\n" not in str(err.value)
    save_plan(tmp_path / "plan.json", make_plan("flat"), TABLES)
    doc = json.loads((tmp_path / "plan.json").read_text())
    doc.update(exchange=exchange, ranks_per_node=per_node)
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(PlanError, match=f"^plan.json: {message}"):
        load_plan(tmp_path / "plan.json", TABLES, WORLD)


# ---- the cost model and the planner ------------------------------------------------------------------

BIG = [TableConfig("big", 10**6, 128), TableConfig("other", 10**6, 64)]
ONLY_TWRW = {t.name: TableConstraints(allowed=(ShardingType.TABLE_ROW_WISE,)) for t in BIG}
ONLY_RW = {t.name: TableConstraints(allowed=(ShardingType.ROW_WISE,)) for t in BIG}
WORK = Workload(batch_per_rank=8192)


def topology(inter_gbps):
    return make_topology("h100-80g", 8, nodes=2, inter_node_bw_bytes_per_s=inter_gbps * GB)


@pytest.mark.parametrize("constraints", [ONLY_TWRW, ONLY_RW], ids=["table_row_wise", "row_wise"])
def test_planner_takes_two_level_when_the_inter_node_link_is_the_bottleneck(constraints):
    slow = plan_tables(BIG, topology(2), WORK, constraints)
    assert (slow.plan.exchange, slow.plan.ranks_per_node) == ("two_level", 4)
    flat = estimate_plan(with_exchange(slow.plan, slow.topology, "flat"), BIG, slow.topology, WORK)
    assert slow.step_s < max(r.time.total for r in flat) * (1 - EXCHANGE_MARGIN)
    assert "exchange: two_level (pooled rows summed within nodes of 4 ranks" in format_result(slow, BIG)
    fast = plan_tables(BIG, topology(450), WORK, constraints)  # as fast as NVLink within the node
    assert (fast.plan.exchange, fast.plan.ranks_per_node) == ("flat", None)
    one_node = plan_tables(BIG, make_topology("h100-80g", 8, inter_node_bw_bytes_per_s=1 * GB), WORK, ONLY_RW)
    assert one_node.plan.exchange == "flat"


def test_costs_follow_the_bytes_that_cross_nodes():
    """A table_row_wise table of dim D on node 0 (4 ranks of 8): flat, each node-0 rank sends its partial
    sums to the 4 ranks of node 1, (W - G) b D bytes; two-level, one summed row per sample, (N - 1) b D."""
    table = [TableConfig("t", 1000, 16)]
    plan = ShardingPlan(8, {"t": rows(ShardingType.TABLE_ROW_WISE, table[0], [0, 1, 2, 3])})
    topo, b, d = topology(2), WORK.batch_per_rank, 16 * 4
    flat, two = output_bytes(plan, topo, WORK, "flat"), output_bytes(plan, topo, WORK, "two_level")
    assert [x.inter_out for x in flat] == [4 * b * d] * 4 + [0] * 4
    assert [x.inter_in for x in flat] == [0] * 4 + [4 * b * d] * 4
    assert [x.inter_out for x in two] == [b * d] * 4 + [0] * 4
    assert [x.inter_in for x in two] == [0] * 4 + [b * d] * 4
    assert [x.intra_out for x in flat] == [3 * b * d] * 4 + [0] * 4
    assert [x.intra_out for x in two] == [2 * 3 * b * d] * 4 + [0] * 4  # every node's samples pass inside
    eff, lat = topo.comm_efficiency, topo.collective_latency_s
    assert output_seconds(plan, topo, WORK, "flat")[0] == pytest.approx(
        max(3 * b * d / topo.intra_node_bw_bytes_per_s, 4 * b * d / topo.inter_node_bw_bytes_per_s) / eff + lat)
    assert output_seconds(plan, topo, WORK, "two_level")[0] == pytest.approx(
        (6 * b * d / topo.intra_node_bw_bytes_per_s + b * d / topo.inter_node_bw_bytes_per_s) / eff + 2 * lat)
    # estimate_plan: the two-level plan pays the difference, forward (rows) and backward (gradients)
    base = estimate_plan(plan, table, topo, WORK)
    two_plan = with_exchange(plan, topo, "two_level")
    delta = [t - f for t, f in zip(output_seconds(plan, topo, WORK, "two_level"),
                                   output_seconds(plan, topo, WORK, "flat"))]
    for f, t, dt in zip(base, estimate_plan(two_plan, table, topo, WORK), delta):
        assert t.time.comm_fwd == pytest.approx(f.time.comm_fwd + dt)
        assert t.time.comm_bwd == pytest.approx(f.time.comm_bwd + dt)
        assert t.memory == f.memory
