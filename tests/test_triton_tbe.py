"""TritonTBE's kernels under Triton's interpreter, held against the plain-PyTorch reference
(``F.embedding_bag(sparse=True)`` per table + ``SparseOptimizer``).

Triton fixes interpreter-or-compiled when it is imported (``@triton.jit`` reads TRITON_INTERPRET, and
so do the jit functions inside ``triton.language``), and reads the same flag again while a kernel runs.
So this module sets TRITON_INTERPRET=1 only around its own import of triton and the kernels, and again
during its own tests (the autouse fixture); other tests and the processes they start never see it. If
something imported triton earlier in the process without the flag, ``test_kernels_are_interpreted``
says so.

The reference, its batches and tolerances are tests/tbe_reference.py's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from sharding.optim import KINDS, OptimSpec, state_names
from sharding.rounding import round_to
from tests.conftest import REPO, run_cli
from tests.tbe_reference import (BATCH, OPTIM, SHAPES, UNTOUCHED, Reference, assert_same_states,
                                 assert_same_tables, check_half_storage_rounds_like_the_reference,
                                 check_sharded_collection_matches_torch_kernel, check_sub_ulp_updates_survive,
                                 make_batch, train_step, train_three_steps_against,
                                 train_with_l2_and_a_changed_lr_against)
from tests.tolerance import assert_within

_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401,E402
    from sharding.kernels import triton_kernels  # noqa: E402  (decorated here, under the interpreter)
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before
from sharding.kernels.triton_tbe import TritonTBE  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_are_interpreted():
    assert triton_kernels.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set in this process"
    assert TritonTBE(SHAPES, OptimSpec("sgd", lr=0.1)).interpreted


def test_building_the_kernel_leaves_the_global_random_stream_alone():
    """The dense MLP is initialised from the global stream after the embeddings: a kernel that drew from
    it would make the model's initialisation depend on the kernel."""
    before = torch.get_rng_state()
    TritonTBE(SHAPES, OptimSpec("sgd", lr=0.1))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_forward_matches_reference(pooling, weighted):
    tbe = TritonTBE(SHAPES, OptimSpec("sgd", **OPTIM), pooling=pooling)
    ref = Reference(tbe.table_weights(), tbe.optim, pooling)
    indices, offsets, psw, _ = make_batch(seed=1, weighted=weighted)
    out = tbe(indices, offsets, psw)
    assert out.shape == (BATCH, sum(w for _, w in SHAPES)) and out.dtype == torch.float32
    assert_within(out, ref.forward(indices, offsets, psw).detach(), ref.forward_tol(indices, offsets, psw), "pooled")
    empty = (offsets[1:] == offsets[:-1]).view(len(SHAPES), BATCH)
    assert empty.any()


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_matches_reference(kind, weighted):
    tbe = TritonTBE(SHAPES, OptimSpec(kind, **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    train_three_steps_against(tbe, ref, seed=10, weighted=weighted)


@pytest.mark.parametrize("kind", KINDS)
def test_l2_on_touched_rows_and_a_changed_lr_match_reference(kind):
    """optimizer.sparse_l2 in the kernel (both summing paths: short runs in place, long ones in pieces),
    and set_lr between steps (a schedule's), against SparseOptimizer(l2=...) with its group lr changed."""
    tbe = TritonTBE(SHAPES, OptimSpec(kind, l2=0.3, **OPTIM))
    tbe.long_run_ids, tbe.piece_ids = 2, 3
    ref = Reference(tbe.table_weights(), tbe.optim)
    train_with_l2_and_a_changed_lr_against(tbe, ref, fresh=TritonTBE(SHAPES, OptimSpec(kind, **OPTIM)))


@pytest.mark.parametrize("kind", KINDS)
def test_long_runs_summed_in_pieces_match_reference(kind):
    """Runs longer than ``long_run_ids`` are summed in pieces by their own kernel first; with these
    limits every repeated row takes that path, and most runs span several pieces."""
    tbe = TritonTBE(SHAPES, OptimSpec(kind, **OPTIM))
    tbe.long_run_ids, tbe.piece_ids = 1, 2
    ref = Reference(tbe.table_weights(), tbe.optim)
    train_three_steps_against(tbe, ref, seed=70, weighted=True)


def test_mean_pooling_training_matches_reference():
    tbe = TritonTBE(SHAPES, OptimSpec("rowwise_adagrad", **OPTIM), pooling="mean")
    tbe.long_run_ids, tbe.piece_ids = 2, 3  # both paths: short runs summed in place, long ones in pieces
    ref = Reference(tbe.table_weights(), tbe.optim, pooling="mean")
    train_three_steps_against(tbe, ref, seed=20, weighted=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    """Rows stored in fp16/bf16 are pooled in fp32; one update is computed in fp32 and rounded once (to
    nearest here: within half an ulp of the reference's fp32 rows)."""
    tbe = TritonTBE(SHAPES, OptimSpec("adagrad", **OPTIM), dtype=dtype, stochastic_rounding=False)
    assert all(w.dtype == dtype for w in tbe.table_weights())
    ref = Reference(tbe.table_weights(), tbe.optim)  # fp32 copies of the rounded rows
    batch = make_batch(seed=30, weighted=True)
    out = train_step(tbe, *batch)
    tol = ref.forward_tol(*batch[:3])
    assert_within(out, ref.train_step(*batch), tol, "pooled")
    ulp = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 0.05)
    for ours, theirs in zip(tbe.table_weights(), ref.params):
        torch.testing.assert_close(ours, theirs.data.to(dtype), **ulp)
    assert_same_states(tbe, ref)


HALF = [torch.float16, torch.bfloat16]
ROUNDINGS = pytest.mark.parametrize("stochastic", [True, False], ids=["stochastic", "nearest"])


def half_tbe_maker(kind: str, l2: float = 0.0, long_run_ids: int | None = None):
    """make_tbe for tests/tbe_reference.py's half-precision checks: a TritonTBE on SHAPES (or the check's
    shapes and optimizer), with ``long_run_ids`` = ``long_run_ids`` and pieces of 2 when given."""
    def make_tbe(dtype, stochastic, shapes=SHAPES, optim=OptimSpec(kind, l2=l2, **OPTIM)):
        tbe = TritonTBE(shapes, optim, dtype=dtype, stochastic_rounding=stochastic)
        if long_run_ids is not None:
            tbe.long_run_ids, tbe.piece_ids = long_run_ids, 2
        return tbe
    return make_tbe


@ROUNDINGS
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_storage_rounds_like_the_reference(dtype, kind, stochastic):
    """Every stored update is exactly sharding.rounding.round_to of the fp32 kernel's (salt = the step)."""
    check_half_storage_rounds_like_the_reference(half_tbe_maker(kind), dtype, kind, stochastic)


@pytest.mark.parametrize("kind", ["adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_storage_rounds_like_the_reference_with_l2_and_long_runs(dtype, kind):
    """The same with L2 (the stored half weight is part of the gradient) and every repeated row summed in
    pieces: the rounding follows whichever path summed the gradient."""
    make_tbe = half_tbe_maker(kind, l2=0.3, long_run_ids=1)
    check_half_storage_rounds_like_the_reference(make_tbe, dtype, kind, stochastic=True)


@pytest.mark.parametrize("dtype", HALF)
def test_sub_ulp_updates_survive_stochastic_rounding(dtype):
    check_sub_ulp_updates_survive(half_tbe_maker("sgd"), dtype)


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """63 fp32 values where rounding to ``dtype`` is delicate: ties, the largest finite values and just
    past them (fp16: 65504, 65520), fp16 subnormals and underflow, fp32 subnormals, inf, nan, both signs,
    and values spread over many binades."""
    info = torch.finfo(dtype)
    half_ulp_of_one = info.eps / 2
    special = [1 + half_ulp_of_one, 1 + 3 * half_ulp_of_one, info.max, info.max * (1 + half_ulp_of_one / 2),
               info.max * (1 + half_ulp_of_one), 3e-6, 4.5e-7, 6.0e-5, 1e-8, 1e-40, 0.0, float("inf"),
               float("nan"), 2.0 ** -24 * 1.5, 65519.0, 65520.0]
    gen = torch.Generator().manual_seed(5)
    spread = torch.randn(32, generator=gen) * torch.exp2(torch.randint(-30, 30, (32,), generator=gen).float())
    values = torch.cat([torch.tensor(special, dtype=torch.float32), spread])
    # not -0.0: the kernel's 0 - lr * g gives +0.0 for it
    return torch.cat([values, -values[:16][values[:16] != 0]])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's fp16 overflow to inf
@ROUNDINGS
@pytest.mark.parametrize("dtype", HALF)
def test_edge_values_round_like_the_reference(dtype, stochastic):
    """One SGD step from zero rows (lr 1: the new row is exactly minus the gradient) onto ``edge_values``;
    the stored bits are round_to's, at a salt whose key does not fit an int32 (the kernel takes it as a
    signed 32-bit value)."""
    target = edge_values(dtype)
    tbe = TritonTBE([(2, target.numel())], OptimSpec("sgd", lr=1.0), dtype=dtype, stochastic_rounding=stochastic)
    with torch.no_grad():
        tbe.table_weights()[0].zero_()
    tbe.set_salt(3)  # salt_key(3) >= 2**31
    out = tbe(torch.tensor([1]), torch.tensor([0, 1]))
    (out * -target).sum().backward()
    got, want = tbe.table_weights()[0][1], round_to(target, dtype, stochastic, salt=3)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), (got, want)
    assert tbe.salt == 4


def test_salt_grows_after_every_backward_even_without_ids():
    tbe = TritonTBE(SHAPES, OptimSpec("sgd", **OPTIM), dtype=torch.bfloat16)
    assert tbe.stochastic_rounding and tbe.salt == 0
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(len(SHAPES) * BATCH + 1, dtype=torch.int64), None,
             torch.randn(BATCH, sum(w for _, w in SHAPES)))
    for batch in [make_batch(seed=60, weighted=False), empty]:
        train_step(tbe, *batch)
    assert tbe.salt == 2
    tbe.set_salt(41)
    train_step(tbe, *empty)
    assert tbe.salt == 42


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adam"])
def test_untouched_rows_never_change(kind):
    tbe = TritonTBE(SHAPES, OptimSpec(kind, **OPTIM))
    before = [w.clone() for w in tbe.table_weights()]
    touched = [torch.zeros(rows, dtype=torch.bool) for rows, _ in SHAPES]
    for step in range(2):
        indices, offsets, psw, upstream = make_batch(seed=40 + step, weighted=False)
        train_step(tbe, indices, offsets, psw, upstream)
        per_table = torch.split(indices, offsets[::BATCH].diff().tolist())
        for t, ids in enumerate(per_table):
            touched[t][ids] = True
    for t, (w, old) in enumerate(zip(tbe.table_weights(), before)):
        assert not touched[t][-UNTOUCHED:].any()
        assert torch.equal(w[~touched[t]], old[~touched[t]]), t
        assert not torch.equal(w[touched[t]], old[touched[t]]), t
        for name, value in tbe.table_states()[t].items():
            if value.dim():
                assert not value[~touched[t]].any(), (t, name)


def test_interface_example():
    tbe = TritonTBE([(1000, 16), (50, 8)], OptimSpec("adagrad", lr=0.05))
    before = [w.clone() for w in tbe.table_weights()]
    out = tbe(torch.tensor([3, 7, 9, 1]), torch.tensor([0, 2, 3, 3, 4]))
    assert out.shape == (2, 24)
    torch.testing.assert_close(out[0, :16], before[0][3] + before[0][7])
    torch.testing.assert_close(out[1, 16:], before[1][1])
    torch.testing.assert_close(out[1, :16], before[0][9])
    torch.testing.assert_close(out[0, 16:], torch.zeros(8))  # the empty bag
    out.sum().backward()
    changed = [(w != old).any(dim=1).nonzero().flatten().tolist() for w, old in zip(tbe.table_weights(), before)]
    assert changed == [[3, 7, 9], [1]]


def test_views_are_the_storage():
    tbe = TritonTBE(SHAPES, OptimSpec("adam", **OPTIM))
    weights, states = tbe.table_weights(), tbe.table_states()
    with torch.no_grad():
        weights[1].fill_(2.0)  # a checkpoint loads this way
    out = tbe(torch.tensor([4]), torch.tensor([0, 0, 1, 1, 1]))  # B = 1: only table 1 has an id
    torch.testing.assert_close(out[0, 8:13], torch.full((5,), 2.0))
    shapes = {"row_col": lambda r, w: (r, w), "row": lambda r, w: (r,), "scalar": lambda r, w: ()}
    for t, (rows, width) in enumerate(SHAPES):
        for name, rule in state_names("adam").items():
            assert tuple(states[t][name].shape) == shapes[rule](rows, width), (t, name)
    states[2]["exp_avg"][5, 3] = 7.0
    assert tbe.exp_avg[int(tbe.weight_offsets[2]) + 5 * 16 + 3] == 7.0
    assert all(s["step"] is tbe.step for s in states)


def test_no_update_without_grad():
    tbe = TritonTBE(SHAPES, OptimSpec("sgd", **OPTIM))
    before = tbe.weights.clone()
    indices, offsets, psw, _ = make_batch(seed=50, weighted=False)
    with torch.no_grad():
        out = tbe(indices, offsets, psw)
    assert not out.requires_grad
    assert torch.equal(tbe.weights, before)


def test_adam_counts_every_backward_even_without_ids():
    tbe = TritonTBE(SHAPES, OptimSpec("adam", **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(len(SHAPES) * BATCH + 1, dtype=torch.int64), None,
             torch.randn(BATCH, sum(w for _, w in SHAPES)))
    for batch in [make_batch(seed=60, weighted=False), empty, make_batch(seed=61, weighted=False)]:
        tol = ref.forward_tol(*batch[:3])
        assert_within(train_step(tbe, *batch), ref.train_step(*batch), tol, "pooled")
    assert int(tbe.step) == 3
    assert_same_tables(tbe, ref)
    assert_same_states(tbe, ref)


def test_rejects_bad_arguments():
    tbe = TritonTBE(SHAPES, OptimSpec("sgd", lr=0.1))
    with pytest.raises(ValueError, match="T \\* B \\+ 1"):
        tbe(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pooling"):
        TritonTBE(SHAPES, OptimSpec("sgd", lr=0.1), pooling="max")
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        TritonTBE(SHAPES, OptimSpec("sgd", lr=0.1), dtype=torch.float64)


def test_benchmark_smoke_runs():
    """The GPU benchmark script, on a tiny shape under the interpreter (its own process)."""
    start = time.monotonic()
    result = run_cli("benchmarks/triton_tbe.py", "--smoke", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for impl in ("triton", "torch"):
        for pooling in (1, 3):  # the --smoke pooling factors: a measured row each
            assert re.search(rf"^\| {impl} \| {pooling} \| [0-9.]+ \|", result.stdout, re.M), result.stdout
        assert re.search(rf"^\| {impl} \| [0-9,]+ \|$", result.stdout, re.M), result.stdout  # end to end
    assert time.monotonic() - start < 60


def test_kernels_compile_for_h100(tmp_path):
    """The real compiler, front end to cubin, which the interpreter never runs (it accepts kernels the
    compiler rejects); in its own process, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "tests/triton_compile_check.py"], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("B cubin") == 9 and result.stdout.endswith("compiled\n"), result.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_collection_with_triton_kernel_matches_torch_kernel(kind):
    """The runtime's lookup on the Triton kernel (one rank, a mixed plan) against its plain-PyTorch one."""
    check_sharded_collection_matches_torch_kernel("triton", kind)
