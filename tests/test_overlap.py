"""Overlap inside a step: the DLRM's bottom MLP runs while the pooled embeddings are exchanged, and its
backward while their gradients are (``train.overlap``). On 1 and 2 real gloo ranks (DDP on 2), every
sharding type in one plan, both lookup kernels: the overlapped step gives bitwise the same losses, dense
parameters and embedding rows as the sequential one; the backward really runs the bottom MLP between the
gradients' exchange start and wait; the step-time breakdown reports each exchange's hidden time."""
import pytest
import torch

from distrec.data.loader import Batch
from distrec.model.dlrm import DLRM
from distrec.trainer.dense_parallel import ddp_dense
from distrec.trainer.phases import EXCHANGES, PhaseTimer
from distrec.trainer.pipeline import pipelined
from distrec.trainer.step import train_step
from sharding.jagged import JaggedBatch
from sharding.optim import OptimSpec
from sharding.planner import simple_plan
from sharding.runtime import EmbeddingOptimizer, ShardedEmbeddingCollection
from sharding.types import TableConfig
from tests.ranks import run_ranks

TABLES = [TableConfig(f"t{i}", 30 + 7 * i, 8, "mean" if i == 3 else "sum") for i in range(5)]
MIXED = {"t1": "data_parallel", "t2": "column_wise", "t3": "table_wise"}  # the rest row-wise
LOCAL_BATCH, STEPS, NUM_DENSE = 12, 4, 5


class EventTimer(PhaseTimer):
    """A phase timer that also keeps the order in which exchanges arrive, for the backward order test."""

    def __init__(self, events):
        super().__init__()
        self.events = events

    def exchange(self, name, in_flight_s, waited_s):
        self.events.append(name)
        super().exchange(name, in_flight_s, waited_s)


def batches(rank):
    g = torch.Generator().manual_seed(10 + rank)
    for _ in range(STEPS):
        lengths = torch.randint(0, 4, (len(TABLES), LOCAL_BATCH), generator=g)
        ids = torch.cat([torch.randint(0, t.num_rows, (int(n.sum()),), generator=g) for t, n in zip(TABLES, lengths)])
        sparse = JaggedBatch([t.name for t in TABLES], ids, lengths.reshape(-1))
        yield Batch(torch.rand(LOCAL_BATCH, NUM_DENSE, generator=g), sparse,
                    (torch.rand(LOCAL_BATCH, generator=g) < 0.3).float())


def train(rank, world, overlap, kernel, pipeline=False):
    """(losses, dense parameters, embedding rows, breakdown summary, event order) after STEPS steps."""
    events = []
    timer = EventTimer(events)
    emb = ShardedEmbeddingCollection(TABLES, simple_plan(TABLES, world, "row_wise", MIXED), rank=rank, seed=0,
                                     optim=OptimSpec("adagrad", 0.1), kernel=kernel, timer=timer)
    torch.manual_seed(0)
    model = DLRM(NUM_DENSE, emb, [16, 8], [16, 8], overlap=overlap)
    # The first bottom layer's gradient is the last of the dense backward's: it says when that ran.
    model.bottom[0].weight.register_hook(lambda g: events.append("bottom_grad"))
    call = ddp_dense(model, [])[0] if world > 1 else model
    opts = [torch.optim.Adam(model.dense_parameters(), lr=0.01), EmbeddingOptimizer(emb)]
    losses = []
    steps = pipelined(batches(rank), emb) if pipeline else batches(rank)
    for batch in steps:
        losses.append(train_step(call, emb, opts, batch, LOCAL_BATCH * world))
        timer.end_step(1.0)
    return (losses, [p.detach().clone() for p in model.dense_parameters()],
            [w.clone() for _, _, w in emb.shard_weights()], timer.summary(0), events)


def both_ways(rank, world, kernel):
    return {overlap: train(rank, world, overlap, kernel) for overlap in (False, True)}


@pytest.mark.parametrize("world,kernel", [(1, "torch"), (2, "torch"), (2, "fbgemm")])
def test_overlapped_step_is_bitwise_the_sequential_step(world, kernel):
    for per_rank in run_ranks(world, both_ways, kernel):
        seq, ovl = per_rank[False], per_rank[True]
        assert ovl[0] == seq[0]  # losses
        assert all(torch.equal(a, b) for a, b in zip(ovl[1], seq[1])), "dense parameters"
        assert len(ovl[2]) == len(seq[2]) and all(torch.equal(a, b) for a, b in zip(ovl[2], seq[2])), "rows"


def test_backward_runs_the_bottom_mlp_while_the_gradients_fly():
    """Sequential: the gradients' exchange is waited on before the bottom MLP's backward runs; overlapped:
    the bottom MLP's backward runs first (the exchange was started before it, by the wait half's backward,
    which the autograd engine runs first as the later-created node)."""
    for per_rank in run_ranks(2, both_ways, "torch"):
        for overlap, result in per_rank.items():
            order = [e for e in result[4] if e in ("grad_a2a", "bottom_grad")]
            step = ["bottom_grad", "grad_a2a"] if overlap else ["grad_a2a", "bottom_grad"]
            assert order == step * STEPS, (overlap, order)


def assert_overlap_fields(summary):
    assert set(summary["overlap_ms"]) == set(EXCHANGES)
    for name, x in summary["overlap_ms"].items():
        assert set(x) == {"in_flight", "waited", "hidden"}, name
        assert 0 <= x["waited"] <= x["in_flight"] and x["hidden"] == pytest.approx(x["in_flight"] - x["waited"])
        assert x["in_flight"] > 0, name  # every exchange ran and was timed, at 1 rank too (as the identity)
    assert "grad_a2a" in summary["ms"]


def pipelined_rank(rank, world):
    return train(rank, world, True, "torch", pipeline=True)[3], train(rank, world, True, "torch")[3]


def test_breakdown_reports_each_exchange_in_flight_waited_and_hidden():
    for summaries in run_ranks(2, pipelined_rank):
        for summary in summaries:
            assert summary["steps"] == STEPS - 1
            assert_overlap_fields(summary)
