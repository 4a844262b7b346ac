"""Mixed precision in the sharded runtime and the trainer: half-precision tables (the plain-PyTorch lookup
against fp32, one process against two ranks, checkpoints), half-precision exchanges, the bf16 dense
all-reduce, and fp16 loss scaling whose overflowing step changes nothing anywhere.

The kernels' half-precision storage is held to the same rule in tests/test_cpu_tbe.py and
tests/test_triton_tbe.py (tests/tbe_reference.py's shared checks)."""
from __future__ import annotations

import json

import pytest
import torch

from distrec.trainer.loss_scale import LossScale
from sharding.lookup import Placed, TorchLookup
from sharding.optim import OptimSpec
from sharding.rounding import DTYPES, round_to, ulp
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import Shard, TableConfig
from tests.conftest import run_cli
from tests.ranks import run_ranks
from tests.test_sharded import GLOBAL_BATCH, KINDS, LR, STEPS, TABLES, local_slice, make_batch, make_plan
from tests.tolerance import C, assert_within, sum_tol

HALVES = ["fp16", "bf16"]


def half_tables(precision: str, tables=TABLES) -> list[TableConfig]:
    return [TableConfig(t.name, t.num_rows, t.dim, t.pooling, precision=precision) for t in tables]


# ---- the plain-PyTorch lookup ----------------------------------------------------------------------

@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("precision", HALVES)
@pytest.mark.parametrize("kind", KINDS)
def test_torch_lookup_half_tables_round_the_fp32_update(kind, precision, stochastic):
    """A half table and an fp32 one with the same (half) rows and the same batch: the same pooled fp32
    output, and after the step the half rows are exactly ``round_to`` of the fp32 ones (salt = the step),
    untouched rows unchanged, the fp32 optimizer state equal. Table b stays fp32 beside it."""
    dtype = DTYPES[precision]
    placed = [Placed(0, Shard(0, 0, 30, 0, 8)), Placed(1, Shard(0, 0, 20, 0, 8))]
    optim = OptimSpec(kind, 0.1, l2=0.01)
    half = TorchLookup(placed, [TableConfig("a", 30, 8, precision=precision), TableConfig("b", 20, 8)], 0, optim,
                       stochastic_rounding=stochastic)
    full = TorchLookup(placed, [TableConfig("a", 30, 8), TableConfig("b", 20, 8)], 0, optim)
    assert [w.dtype for w in half.weights] == [dtype, torch.float32]  # groups by (width, precision)
    gen = torch.Generator().manual_seed(3)
    for step in range(3):
        with torch.no_grad():
            full.weights[0][:30].copy_(half.weights[0].float())
            full.weights[0][30:].copy_(half.weights[1])
        before = half.weights[0].detach().clone()
        lengths = torch.randint(0, 4, (2 * 5,), generator=gen)
        values = torch.cat([torch.randint(0, 25, (int(lengths[:5].sum()),), generator=gen),
                            torch.randint(0, 20, (int(lengths[5:].sum()),), generator=gen)])
        out_half, out_full = half.pool(lengths, values, None, [5]), full.pool(lengths, values, None, [5])
        assert out_half.dtype == torch.float32 and torch.equal(out_half, out_full)
        upstream = torch.randn(out_half.shape, generator=gen)
        (out_half * upstream).sum().backward(), (out_full * upstream).sum().backward()
        half.set_salt(step)
        half.step(), full.step()
        want = round_to(full.weights[0].detach()[:30], dtype, stochastic, step)
        touched = torch.zeros(30, dtype=torch.bool)
        touched[values[:int(lengths[:5].sum())]] = True
        assert torch.equal(half.weights[0][touched], want[touched]), step
        assert torch.equal(half.weights[0][~touched], before[~touched]), step
        assert torch.equal(half.weights[1], full.weights[0][30:]), step
        for i in range(2):
            for name, value in half.views(i)[1].items():
                assert value.dtype == torch.float32 and torch.equal(value, full.views(i)[1][name]), (step, name)


# ---- sharded over ranks ------------------------------------------------------------------------------

def _train_half_tables(rank, world, kind, precision, kernel):
    """STEPS steps of test_sharded's mixed plan with ``precision`` tables on ``world`` ranks: this rank's
    slice of each global batch, the whole batch's upstream gradient; returns (pooled, shard weights)."""
    emb = ShardedEmbeddingCollection(half_tables(precision), make_plan(world, kind, kernel), rank=rank,
                                     seed=0, optim=OptimSpec(kind, LR), kernel=kernel)
    per = -(-GLOBAL_BATCH // world)
    lo, hi = rank * per, min(GLOBAL_BATCH, (rank + 1) * per)
    pooled = []
    for step in range(STEPS):
        jb, upstream = make_batch(step)
        emb.set_salt(step)
        out = emb(local_slice(jb, lo, hi))
        (out * upstream[lo:hi]).sum().backward()
        emb.sync_replica_grads()
        emb.step()
        pooled.append(out.detach())
    return pooled, [(name, s, w.clone()) for name, s, w in emb.shard_weights()]


def _whole(shard_lists, tables) -> dict[str, torch.Tensor]:
    """Every table whole from each rank's list of (table, shard, its rows)."""
    whole = {t.name: torch.zeros(t.num_rows, t.dim) for t in tables}
    for shards in shard_lists:
        for name, s, w in shards:
            whole[name][s.row_start:s.row_end, s.col_start:s.col_end] = w.float()
    return whole


@pytest.mark.parametrize("precision", HALVES)
@pytest.mark.parametrize("kind", ["adagrad", "adam"])
def test_half_tables_on_two_ranks_follow_one_process(kind, precision):
    """With a fixed upstream gradient an update does not depend on the weights, so N ranks differ from
    one process only by fp32 reordering (the tolerance of tests/test_sharded.py's fp32 runs) plus, per
    step, at most one unit in the last place of the stored dtype where the two fp32 results round apart
    (the hash of a value that differs by one fp32 ulp is another draw). A missed or misplaced update is
    off by ~LR = 0.1, 25x more than three bf16 ulps at |w| < 1 (0.0039 each)."""
    ref = run_ranks(1, _train_half_tables, kind, precision, "torch")
    two = run_ranks(2, _train_half_tables, kind, precision, "torch")
    ref_w, two_w = _whole([r[1] for r in ref], TABLES), _whole([r[1] for r in two], TABLES)
    dtype = DTYPES[precision]
    for t in TABLES:
        a, b = two_w[t.name], ref_w[t.name]
        tol = STEPS * ulp(b, dtype) + sum_tol(b.abs() + STEPS * LR, STEPS * (GLOBAL_BATCH * 4 + 4))
        assert_within(a, b, tol, f"{kind} {precision} table {t.name}")
    for rank, (pooled, _) in enumerate(two):  # the first step's lookups: the same stored rows
        lo = rank * -(-GLOBAL_BATCH // 2)
        first = ref[0][0][0][lo:lo + pooled[0].shape[0]]
        assert_within(pooled[0], first, sum_tol(first.abs() + 1.0, 8), f"rank {rank} pooled")


# ---- half-precision compute on N ranks ------------------------------------------------------------

def _compute_step(rank, world, mode):
    """One forward and backward of a small DLRM (cat interaction over test_sharded's mixed plan, so
    row-, table-, column-wise and replicated tables) on ``world`` ranks for the same global batch, then a
    sparse SGD step of lr 1, so each table moves by minus its gradient. ``mode``: the compute precision,
    or "abs" for fp32 on |weights| and |inputs| (tests/test_model.py's magnitudes: every value becomes
    the sum of the magnitudes of its terms). Returns the logits, the dense gradients (summed over ranks),
    the tables' moves, and the model's rounding and term counts."""
    from distrec.model.dlrm import DLRM
    from distrec.trainer.dense_parallel import ddp_dense
    from tests.test_model import accumulated_terms, half_roundings

    torch.manual_seed(0)
    emb = ShardedEmbeddingCollection(SUM_TABLES, make_plan(world, "sgd", "torch"), rank=rank, seed=0,
                                     optim=OptimSpec("sgd", 1.0), kernel="torch")
    model = DLRM(4, emb, [8, 8], [16], interaction="cat", precision="fp32" if mode == "abs" else mode)
    dense = torch.randn(GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(5))
    if mode == "abs":
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
        dense = dense.abs()  # make_batch's per-sample weights are >= 0 already
    call = ddp_dense(model, [])[0] if world > 1 else model
    per = -(-GLOBAL_BATCH // world)
    lo, hi = rank * per, min(GLOBAL_BATCH, (rank + 1) * per)
    jb, _ = make_batch(0, SUM_TABLES)
    out = call(dense[lo:hi], local_slice(jb, lo, hi))
    out.sum().backward()
    before = [(n, s, w.clone()) for n, s, w in emb.shard_weights()]
    emb.sync_replica_grads()
    emb.step()
    moved = [(n, s, (w - b).abs() if mode == "abs" else w - b) for (n, s, b), (_, _, w) in zip(before, emb.shard_weights())]
    return (out.detach(), [p.grad.clone() for p in model.dense_parameters()], moved,
            half_roundings(model), accumulated_terms(model, GLOBAL_BATCH, 4))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_compute_on_two_ranks_follows_one_rank_within_its_roundings(precision):
    """bf16/fp16 autocast on 2 ranks against 1 rank, the same global batch and weights: each run is within
    tests/test_model.py's bound of the fp32 computation (k roundings of eps / 2 of each value's magnitude
    in forward, as many again in backward, C = 2 for second-order terms, plus fp32's reordering), so they
    are within twice that of each other: logits, dense gradients (each rank's bf16 weight gradient
    rounded before DDP sums it, which the same bound covers) and every table's move. A sample lost or
    counted twice, or a rank's gradients missing, is off by the whole of its terms."""
    eps = torch.finfo(DTYPES[precision]).eps
    mag_out, mag_dense, mag_moved, _, _ = run_ranks(1, _compute_step, "abs")[0]
    fp32 = run_ranks(1, _compute_step, "fp32")[0]
    one = run_ranks(1, _compute_step, precision)[0]
    two = run_ranks(2, _compute_step, precision)
    k, (n_forward, n) = one[3], one[4]
    forward_tol = 2 * (C * k * eps / 2 * mag_out + sum_tol(mag_out, n_forward))
    assert_within(torch.cat([r[0] for r in two]), one[0], forward_tol, f"{precision} logits, 2 ranks vs 1")
    assert ((one[0] - fp32[0]).abs() > sum_tol(mag_out, n_forward)).any(), f"{precision} autocast did not run"
    for i, (a, b, mag) in enumerate(zip(two[0][1], one[1], mag_dense)):
        assert_within(a, b, 2 * (C * 2 * k * eps / 2 * mag + sum_tol(mag, n)), f"{precision} dense gradient {i}")
    whole_mag, whole_one = _whole([mag_moved], SUM_TABLES), _whole([one[2]], SUM_TABLES)
    for name, a in _whole([r[2] for r in two], SUM_TABLES).items():
        mag = whole_mag[name]
        assert_within(a, whole_one[name], 2 * (C * 2 * k * eps / 2 * mag + sum_tol(mag, n)),
                      f"{precision} table {name} move")


# ---- half-precision exchanges ----------------------------------------------------------------------

SUM_TABLES = [TableConfig(t.name, t.num_rows, t.dim) for t in TABLES]  # sum pooling: the gradient is upstream


def _exchange_step(rank, world, comm, upstream_dtype):
    """One SGD (lr 1) step of a table-wise plan on ``world`` ranks with exchanges in ``comm``; the upstream
    gradient rounded to ``upstream_dtype`` first. Returns (pooled, shard weights after the step)."""
    from sharding.planner import simple_plan

    emb = ShardedEmbeddingCollection(SUM_TABLES, simple_plan(SUM_TABLES, world, "table_wise"), rank=rank, seed=0,
                                     optim=OptimSpec("sgd", 1.0), kernel="torch", comm_precision=comm)
    jb, upstream = make_batch(0, SUM_TABLES)
    per = -(-GLOBAL_BATCH // world)
    lo, hi = rank * per, min(GLOBAL_BATCH, (rank + 1) * per)
    out = emb(local_slice(jb, lo, hi))
    (out * upstream[lo:hi].to(DTYPES[upstream_dtype]).float()).sum().backward()
    emb.step()
    return out.detach(), [(name, s, w.clone()) for name, s, w in emb.shard_weights()]


@pytest.mark.parametrize("forward,backward", [("bf16", "fp32"), ("fp16", "bf16"), ("fp32", "fp16")])
def test_half_exchanges_round_what_travels_and_nothing_else(forward, backward):
    """Table-wise on 2 ranks: every pooled value crosses the exchange once, so it arrives as the fp32
    result rounded once to the forward dtype; the gradients cross back once, so the rows move exactly as
    with fp32 exchanges and an upstream gradient rounded to the backward dtype (sum pooling, SGD lr 1)."""
    fp32 = run_ranks(2, _exchange_step, ("fp32", "fp32"), backward)
    half = run_ranks(2, _exchange_step, (forward, backward), "fp32")
    for rank in range(2):
        assert torch.equal(half[rank][0], fp32[rank][0].to(DTYPES[forward]).float()), rank
        for (name, _, got), (_, _, want) in zip(half[rank][1], fp32[rank][1]):
            assert torch.equal(got, want), (rank, name)


class _Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(5, 3)
        self.embeddings = torch.nn.Module()  # ddp_dense leaves a model's embeddings to the sharded runtime

    def forward(self, x):
        return self.linear(x)


def _dense_grads(rank, world, precision):
    from distrec.trainer.dense_parallel import ddp_dense

    torch.manual_seed(0)
    model = _Dense()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + rank))
    model(x).pow(2).sum().backward()
    local = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ddp, _ = ddp_dense(model, [], comm_precision=precision)
    ddp(x).pow(2).sum().backward()
    return local, [p.grad.clone() for p in model.parameters()]


def test_the_dense_all_reduce_in_bf16_sums_bf16_gradients():
    """plan.dense_comm_precision = "bf16": each rank's gradient travels as bf16 and the sum of two bf16
    values is rounded once to bf16, so the result is exactly (g0.bf16 + g1.bf16).bf16 in fp32."""
    results = run_ranks(2, _dense_grads, "bf16")
    for i in range(2):
        g0, g1 = (results[r][0][i].to(torch.bfloat16) for r in range(2))
        want = (g0 + g1).float()
        assert torch.equal(results[0][1][i], want) and torch.equal(results[1][1][i], want), i
        assert not torch.equal(want, results[0][0][i] + results[1][0][i])  # the rounding did happen


# ---- fp16 loss scaling --------------------------------------------------------------------------------

def test_the_loss_scale_follows_grad_scaler_and_keeps_its_state_keys():
    s = LossScale(8.0, growth_interval=3)
    assert s.finite([torch.ones(2)]) and s.scale == 8.0
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([4.0])]
    assert not s.finite(grads) and s.scale == 4.0 and s.skipped == 1
    for _ in range(3):
        g = [torch.tensor([8.0])]
        assert s.finite(g) and g[0].item() == 2.0  # unscaled in place by 1 / 4
    assert s.scale == 8.0  # three finite steps in a row: doubled
    assert set(s.state_dict()) == set(torch.amp.GradScaler("cpu").state_dict())
    other = LossScale()
    other.load_state_dict(s.state_dict())
    assert other.state_dict() == s.state_dict()


def _fp16_steps(rank, world, kernel):
    """Three fp16 steps of a small DLRM on a mixed plan (row-wise, table-wise, column-wise, data-parallel):
    a normal one, one whose dense input overflows fp16 on rank 1 only, then a normal one. Returns every
    weight and optimizer state after each step, and the loss scale's record."""
    from distrec.model.dlrm import DLRM
    from distrec.trainer.dense_parallel import ddp_dense
    from distrec.trainer.step import train_step
    from sharding.runtime import EmbeddingOptimizer

    torch.manual_seed(0)
    emb = ShardedEmbeddingCollection(SUM_TABLES, make_plan(world, "adagrad", kernel), rank=rank, seed=0,
                                     optim=OptimSpec("adagrad", LR), kernel=kernel, defer_updates=True)
    model = DLRM(4, emb, [8, 8], [16], interaction="cat", precision="fp16")
    opts = [torch.optim.Adam(model.dense_parameters(), lr=1e-2), EmbeddingOptimizer(emb)]
    ddp, opts = ddp_dense(model, opts)
    scaler, snapshots = LossScale(2.0**10), []
    per = -(-GLOBAL_BATCH // world)
    lo, hi = rank * per, min(GLOBAL_BATCH, (rank + 1) * per)
    for step in range(3):
        jb, _ = make_batch(step, SUM_TABLES)
        dense = torch.randn(GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(step))[lo:hi]
        if step == 1 and rank == world - 1:
            dense[0, 0] = 1e6  # the bottom MLP's fp16 output overflows: inf, then nan gradients
        labels = (torch.arange(lo, hi) % 3 == 0).float()
        batch = type("B", (), {"dense": dense, "sparse": local_slice(jb, lo, hi), "labels": labels})
        train_step(ddp, emb, opts, batch, GLOBAL_BATCH, scaler)
        snapshots.append({"dense": [p.detach().clone() for p in model.dense_parameters()],
                          "adam": [{k: v.clone() for k, v in s.items()} for s in opts[0].state.values()],
                          "shards": [(n, w.clone(), {k: v.clone() for k, v in st.items()})
                                     for n, _, w, st in emb.held_shards()],
                          "scale": scaler.scale, "skipped": scaler.skipped})
    return snapshots


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("kernel", ["torch", "cpu"])
def test_an_overflowing_fp16_step_changes_nothing_on_any_rank(kernel):
    """Rank 1's overflow makes the step skip on both ranks: no dense weight, Adam state, shard, replica
    or Adagrad state moves (bit for bit), the scale halves; the next step trains again."""
    for rank, snaps in enumerate(run_ranks(2, _fp16_steps, kernel)):
        first, skipped, after = snaps
        assert (first["skipped"], skipped["skipped"], after["skipped"]) == (0, 1, 1), rank
        assert skipped["scale"] == first["scale"] / 2 == after["scale"], rank
        for part in ("dense", "adam", "shards"):
            assert _same(skipped[part], first[part]), (rank, part)
            assert not _same(after[part], skipped[part]), (rank, part)


def test_fp16_training_skips_logs_and_resumes_with_its_loss_scale(small_data, tmp_path):
    """A first scale far too large: the run skips its first steps (each logged, the scale halved each
    time), then trains; the checkpoint keeps the scale, and a resumed run starts from it."""
    cfg_path, data = small_data
    common = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train",
              "--config", str(cfg_path), f"--data.path={data}", "--train.global_batch_size=252",
              "--train.precision=fp16", f"--train.loss_scale={2.0**30}", "--tables.precision=fp16", "--train.epochs=3",
              "--plan.default=row_wise", f"--checkpoint.dir={tmp_path / 'ckpt'}", "--train.log_every_steps=1"]
    r = run_cli(*common, "--train.max_steps=40", f"--logging.dir={tmp_path / 'a'}")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    skips = [x for x in recs if x["kind"] == "skip"]
    # 2**30 halved until fp16 gradients fit (the usual scale is 2**16): a skip at each of the first steps
    assert len(skips) >= 5 and [x["step"] for x in skips] == list(range(len(skips)))
    assert [x["skipped"] for x in skips] == list(range(1, len(skips) + 1))
    assert all(b["loss_scale"] == a["loss_scale"] / 2 for a, b in zip(skips, skips[1:]))
    assert "gradients overflowed in fp16; the step updated nothing" in r.stdout
    losses = [x["loss"] for x in recs if x["kind"] == "train"]
    assert losses[-1] < losses[skips[-1]["step"]]  # it trains once the scale fits
    saved = torch.load(tmp_path / "ckpt" / "step_40" / "common.pt", weights_only=False)["loss_scale"]
    assert saved["scale"] == skips[-1]["loss_scale"] and saved["_growth_tracker"] == 40 - len(skips)
    shards = torch.load(tmp_path / "ckpt" / "step_40" / "rank_0.pt", weights_only=False)["shards"]
    assert {p["weight"].dtype for p in shards} == {torch.float16}
    r = run_cli(*common, "--train.max_steps=42", f"--logging.dir={tmp_path / 'b'}", "--checkpoint.resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert not [x for x in resumed if x["kind"] == "skip"]  # the resumed scale fits: a fresh 1e12 would not


# ---- checkpoints ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", HALVES)
def test_half_tables_keep_their_precision_through_checkpoints_and_resharding(small_data, tmp_path, precision):
    """Trained on 2 ranks with half tables: the checkpoint, `reshard --unsharded`, `reshard --world-size 3`
    and a resume on 1 rank (which saves again at its end) all hold the same half-precision values, bit for
    bit: a copy between tensors of one dtype rounds nothing."""
    from distrec.train import main as train_main
    from distrec.trainer.checkpoint import load_latest, open_latest
    from sharding.checkpoint import whole_tables

    cfg_path, data = small_data
    args = ["--config", str(cfg_path), f"--data.path={data}", f"--tables.precision={precision}",
            "--train.global_batch_size=252", "--plan.default=row_wise"]
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train", *args,
                "--train.max_steps=5", f"--checkpoint.dir={tmp_path / 'two'}", f"--logging.dir={tmp_path / 'l2'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tables: {precision} (all), updates rounded stochastically" in r.stdout
    saved = {p["table"]: p["weight"] for p in whole_tables(load_latest(tmp_path / "two")["shards"], "adagrad")}
    assert {w.dtype for w in saved.values()} == {DTYPES[precision]}
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(tmp_path / "two"), "--out", str(tmp_path / "m.pt"),
                "--unsharded")
    assert r.returncode == 0, r.stderr
    exported = torch.load(tmp_path / "m.pt", weights_only=False)["tables"]
    assert all(exported[n].dtype == DTYPES[precision] and torch.equal(exported[n], w) for n, w in saved.items())
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(tmp_path / "two"), "--out", str(tmp_path / "three"),
                "--world-size", "3")
    assert r.returncode == 0, r.stderr
    three = open_latest(tmp_path / "three")
    assert {p["weight"].dtype for rank in range(3) for p in three.rank_state(rank)["shards"]} == {DTYPES[precision]}
    assert train_main([*args, "--train.max_steps=5", "--checkpoint.resume=true", f"--checkpoint.dir={tmp_path / 'two'}",
                       f"--logging.dir={tmp_path / 'l1'}"]) == 0  # resumed at step 5 of 5: loads, evaluates, saves
    again = {p["table"]: p["weight"] for p in whole_tables(load_latest(tmp_path / "two")["shards"], "adagrad")}
    assert all(again[n].dtype == DTYPES[precision] and torch.equal(again[n], w) for n, w in saved.items())
