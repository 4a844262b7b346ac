"""CpuTBE, distrec's C++ CPU kernel, held against the plain-PyTorch reference (``F.embedding_bag(sparse=True)``
per table + ``SparseOptimizer``, tests/tbe_reference.py), and the runtime's choice of it.

The extension is built at install (``make install``, or ``python setup.py build_ext --inplace``); these
tests need it and fail, saying how to build it, when it is missing.
"""
from __future__ import annotations

import re

import pytest
import torch

from sharding.kernels import cpu_tbe
from sharding.kernels.cpu_tbe import CpuTBE
from sharding.lookup import choose_kernel
from sharding.optim import KINDS, OptimSpec, state_names
from sharding.rounding import round_to
from tests.conftest import run_cli
from tests.tbe_reference import (BATCH, MAX_BAG, OPTIM, SHAPES, Reference, assert_same_states,
                                 assert_same_tables, check_half_storage_rounds_like_the_reference,
                                 check_sharded_collection_matches_torch_kernel, check_sub_ulp_updates_survive,
                                 make_batch, train_step, train_three_steps_against,
                                 train_with_l2_and_a_changed_lr_against)
from tests.tolerance import assert_within

# A bigger batch over bigger tables: thousands of ids per table, so the work is split over threads
# (several update tasks, runs cut at task edges), the radix sort takes 2-3 passes (rows > ids) and the
# counting sort runs on the small table (rows <= ids); widths 16, 3 and 5.
BIG_SHAPES = [(100_000, 16), (50, 3), (3_000, 5)]
BIG_BATCH, BIG_MAX_BAG = 600, 8
BIG_N_STEP = BIG_BATCH * BIG_MAX_BAG + 4  # as tbe_reference's N_STEP: a row's gradient terms + the update's ops
HALF = [torch.float16, torch.bfloat16]
HALF_IDS = ["fp16", "bf16"]
ROUNDING_IDS = ["nearest", "stochastic"]


@pytest.fixture(autouse=True)
def built():
    module, error = cpu_tbe.load()
    assert module is not None, f"the CPU kernel is not built ({error}); {cpu_tbe.BUILD_HINT}"


def test_interface_example():
    tbe = CpuTBE([(1000, 16), (50, 5)], OptimSpec("adagrad", lr=0.05))
    before = [w.clone() for w in tbe.table_weights()]
    out = tbe(torch.tensor([3, 7, 9, 1]), torch.tensor([0, 2, 3, 3, 4]))
    assert out.shape == (2, 21)
    torch.testing.assert_close(out[0, :16], before[0][3] + before[0][7])
    torch.testing.assert_close(out[1, 16:], before[1][1])
    torch.testing.assert_close(out[1, :16], before[0][9])
    assert torch.equal(out[0, 16:], torch.zeros(5))  # the empty bag
    out.sum().backward()
    changed = [(w != old).any(dim=1).nonzero().flatten().tolist() for w, old in zip(tbe.table_weights(), before)]
    assert changed == [[3, 7, 9], [1]]


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_forward_matches_reference(weighted):
    tbe = CpuTBE(SHAPES, OptimSpec("sgd", **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    indices, offsets, psw, _ = make_batch(seed=1, weighted=weighted)
    out = tbe(indices, offsets, psw).detach()
    assert out.shape == (BATCH, sum(w for _, w in SHAPES)) and out.dtype == torch.float32
    assert_within(out, ref.forward(indices, offsets, psw).detach(), ref.forward_tol(indices, offsets, psw), "pooled")
    assert (offsets[1:] == offsets[:-1]).any()  # empty bags


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_matches_reference(kind, weighted):
    tbe = CpuTBE(SHAPES, OptimSpec(kind, **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    train_three_steps_against(tbe, ref, seed=10, weighted=weighted)


@pytest.mark.parametrize("kind", KINDS)
def test_l2_on_touched_rows_and_a_changed_lr_match_reference(kind):
    tbe = CpuTBE(SHAPES, OptimSpec(kind, l2=0.3, **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    train_with_l2_and_a_changed_lr_against(tbe, ref, fresh=CpuTBE(SHAPES, OptimSpec(kind, **OPTIM)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind,l2", [("sgd", 0.0), ("adagrad", 0.1), ("rowwise_adagrad", 0.0), ("adam", 0.1)])
def test_big_batches_on_threads_match_reference(kind, l2, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tbe = CpuTBE(BIG_SHAPES, OptimSpec(kind, l2=l2, **OPTIM))
        ref = Reference(tbe.table_weights(), tbe.optim, max_bag=BIG_MAX_BAG, n_step=BIG_N_STEP)
        train_three_steps_against(tbe, ref, seed=90, weighted=True, shapes=BIG_SHAPES, batch=BIG_BATCH,
                                  max_bag=BIG_MAX_BAG)
    finally:
        torch.set_num_threads(before)


def test_one_hot_batches_match_reference():
    """Every bag one id (the radix sort's usual case), ids hot enough to repeat across bags."""
    tbe = CpuTBE(BIG_SHAPES, OptimSpec("rowwise_adagrad", **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim, max_bag=1, n_step=BIG_BATCH + 4)
    for step in range(2):
        indices, offsets, _, upstream = make_batch(seed=95 + step, weighted=False, shapes=BIG_SHAPES,
                                                   batch=BIG_BATCH)
        lengths = offsets.diff()
        first = offsets[:-1][lengths > 0]  # each non-empty bag keeps its first id
        batch = indices[first], torch.cat([offsets[:1], lengths.clamp(max=1).cumsum(0)]), None, upstream
        assert_within(train_step(tbe, *batch), ref.train_step(*batch), ref.forward_tol(*batch[:3]), "pooled")
    assert_same_tables(tbe, ref)
    assert_same_states(tbe, ref)


def test_untouched_rows_and_state_never_change():
    tbe = CpuTBE(SHAPES, OptimSpec("adam", **OPTIM))
    before = [w.clone() for w in tbe.table_weights()]
    indices, offsets, psw, upstream = make_batch(seed=40, weighted=False)
    train_step(tbe, indices, offsets, psw, upstream)
    for t, ids in enumerate(torch.split(indices, offsets[::BATCH].diff().tolist())):
        touched = torch.zeros(SHAPES[t][0], dtype=torch.bool)
        touched[ids] = True
        assert torch.equal(tbe.table_weights()[t][~touched], before[t][~touched]), t
        assert not torch.equal(tbe.table_weights()[t][touched], before[t][touched]), t
        assert not tbe.table_states()[t]["exp_avg"][~touched].any(), t


def test_views_are_the_storage():
    tbe = CpuTBE(SHAPES, OptimSpec("adam", **OPTIM))
    weights, states = tbe.table_weights(), tbe.table_states()
    with torch.no_grad():
        weights[1].fill_(2.0)  # a checkpoint loads this way
    out = tbe(torch.tensor([4]), torch.tensor([0, 0, 1, 1, 1]))  # B = 1: only table 1 has an id
    torch.testing.assert_close(out[0, 8:13], torch.full((5,), 2.0))
    shapes = {"row_col": lambda r, w: (r, w), "row": lambda r, w: (r,), "scalar": lambda r, w: ()}
    for kind in KINDS:
        for t, ((rows, width), views) in enumerate(zip(SHAPES, CpuTBE(SHAPES, OptimSpec(kind, lr=0.1)).table_states())):
            assert set(views) == set(state_names(kind))
            for name, rule in state_names(kind).items():
                assert tuple(views[name].shape) == shapes[rule](rows, width), (kind, t, name)
    states[2]["exp_avg"][5, 3] = 7.0
    assert tbe.exp_avg[40 * 8 + 25 * 5 + 5 * 16 + 3] == 7.0
    assert all(s["step"] is tbe.step for s in states)


def test_adam_counts_every_backward_even_without_ids():
    tbe = CpuTBE(SHAPES, OptimSpec("adam", **OPTIM))
    ref = Reference(tbe.table_weights(), tbe.optim)
    empty = (torch.zeros(0, dtype=torch.int64), torch.zeros(len(SHAPES) * BATCH + 1, dtype=torch.int64), None,
             torch.randn(BATCH, sum(w for _, w in SHAPES)))
    for batch in [make_batch(seed=60, weighted=False), empty, make_batch(seed=61, weighted=False)]:
        assert_within(train_step(tbe, *batch), ref.train_step(*batch), ref.forward_tol(*batch[:3]), "pooled")
    assert int(tbe.step) == 3
    assert_same_tables(tbe, ref)
    assert_same_states(tbe, ref)


def test_no_update_without_grad_and_the_global_random_stream_is_left_alone():
    rng = torch.get_rng_state()
    tbe = CpuTBE(SHAPES, OptimSpec("sgd", **OPTIM))
    assert torch.equal(torch.get_rng_state(), rng)
    before = tbe.weights.clone()
    with torch.no_grad():
        out = tbe(*make_batch(seed=50, weighted=False)[:3])
    assert not out.requires_grad and torch.equal(tbe.weights, before)


def test_rejects_bad_arguments():
    tbe = CpuTBE(SHAPES, OptimSpec("sgd", lr=0.1))
    with pytest.raises(ValueError, match="T \\* B \\+ 1"):
        tbe(torch.tensor([1, 2]), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="out of its table's rows"):
        tbe(torch.tensor([40]), torch.tensor([0, 1, 1, 1, 1]))  # table 0 has 40 rows
    with pytest.raises(RuntimeError, match="out of its table's rows"):
        tbe(torch.tensor([-1]), torch.tensor([0, 1, 1, 1, 1]))
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        CpuTBE(SHAPES, OptimSpec("sgd", lr=0.1), device="meta")
    assert MAX_BAG > 1  # the batches above are multi-hot


def test_auto_picks_the_cpu_kernel_on_cpu():
    shapes = [(100, 6), (40, 8)]  # a width fbgemm cannot take: cpu still can
    for kind in KINDS:
        for l2 in (0.0, 0.1):
            kernel, why = choose_kernel("auto", shapes, OptimSpec(kind, 0.1, l2=l2), torch.device("cpu"))
            assert kernel == "cpu" and "CPU kernel" in why, (kind, l2, why)
    assert choose_kernel("cpu", shapes, OptimSpec("sgd", 0.1), torch.device("cpu"))[0] == "cpu"
    assert choose_kernel("fbgemm", [(100, 8)], OptimSpec("sgd", 0.1), torch.device("cpu"))[0] == "fbgemm"
    assert choose_kernel("torch", shapes, OptimSpec("sgd", 0.1), torch.device("cpu"))[0] == "torch"


def test_without_the_extension_auto_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu_tbe, "load", lambda: (None, "ImportError: No module named 'sharding.kernels._cpu_tbe'"))
    why = cpu_tbe.unsupported([(100, 8)], OptimSpec("sgd", 0.1), torch.device("cpu"))
    assert "not importable (ImportError: No module named" in why and "make install" in why
    kernel, reason = choose_kernel("auto", [(100, 8)], OptimSpec("sgd", 0.1), torch.device("cpu"))
    assert kernel == "fbgemm" and f"not cpu: {why}" in reason
    kernel, reason = choose_kernel("auto", [(100, 6)], OptimSpec("sgd", 0.1), torch.device("cpu"))
    assert kernel == "torch" and f"not cpu: {why}" in reason
    with pytest.raises(ValueError, match="embedding kernel cpu cannot run this plan: distrec's CPU kernel is not"):
        choose_kernel("cpu", [(100, 8)], OptimSpec("sgd", 0.1), torch.device("cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_sharded_collection_with_cpu_kernel_matches_torch_kernel(kind):
    """The runtime's lookup on the CPU kernel (one rank, a mixed plan, mean tables) against its plain one."""
    check_sharded_collection_matches_torch_kernel("cpu", kind)


def test_benchmark_runs_and_prints_a_row_per_config():
    """benchmarks/cpu_tbe.py --quick on 2 small tables (its own process); the 1e6-row config does not fit
    the --mem-gb given and is listed as skipped."""
    result = run_cli("benchmarks/cpu_tbe.py", "--quick", "--tables", "2", "--batch", "64", "--repeats", "1",
                     "--mem-gb", "0.5", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| [0-9.e+]+ \| (\d+) \| (uniform|zipf) \| \w+ \| ([0-9.]+) \| [0-9.]+ \| [0-9.]+ \| "
                      r"[0-9.]+ \| [0-9.]+ \| \d+% \|$", result.stdout, re.M)
    assert len(rows) == 15, result.stdout
    assert re.search(r"^\| 64 \| 1e\+06 \| 1 \| uniform \| rowwise_adagrad \| skipped: needs", result.stdout, re.M)
    assert re.search(r"measured memory bandwidth \(copy\): [0-9.]+ GB/s", result.stdout)


def half_maker(kind: str = "sgd", l2: float = 0.0, shapes=SHAPES):
    """The ``make_tbe`` of tbe_reference's half checks: a CpuTBE of (dtype, stochastic_rounding[, shapes, optim])."""
    def make(dtype, stochastic, shapes=shapes, optim=OptimSpec(kind, l2=l2, **OPTIM)):
        return CpuTBE(shapes, optim, dtype=dtype, stochastic_rounding=stochastic)
    return make


def rounding_edge_cases() -> torch.Tensor:
    """Zeros, signs, fp16's overflow edge (65504 is its largest, 65520 rounds to infinity), fp16 and fp32
    subnormals, bf16's range ends, non-finite values, then random values over 2^-40..2^40."""
    edges = [0.0, -0.0, 1.0, -1.0, 1 / 3, -2 / 3, 65504.0, 65519.0, 65520.0, -65520.0, 7e4, 6.1035156e-05,
             6.09e-05, -3e-6, 6e-8, 2.9e-8, -1e-7, 1e-40, -1e-40, 1e-45, 3.38e38, -3.4028235e38, 1.0 + 2**-9,
             1.0 + 2**-12, float("inf"), -float("inf"), float("nan")]
    gen = torch.Generator().manual_seed(3)
    spread = torch.randn(4000, generator=gen) * torch.exp2(torch.randint(-40, 40, (4000,), generator=gen).float())
    return torch.cat([torch.tensor(edges), spread])


@pytest.mark.parametrize("stochastic", [False, True], ids=ROUNDING_IDS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_the_kernels_rounding_is_round_to_bit_for_bit(dtype, stochastic):
    """The C++ rounding the update stores with, against sharding.rounding.round_to, on several salts. NaN
    bits excepted: torch's own bf16 conversion writes every NaN as 0xffff, c10::BFloat16 as 0x7fc0."""
    x = rounding_edge_cases()
    nan = x.isnan()
    for salt in (0, 1, 7, 2**40 + 3):
        ours, want = cpu_tbe.round_like_the_kernel(x, dtype, stochastic, salt), round_to(x, dtype, stochastic, salt)
        assert ours.dtype == dtype
        assert torch.equal(ours[~nan].view(torch.int16), want[~nan].view(torch.int16)), salt
        assert ours[nan].isnan().all(), salt


@pytest.mark.parametrize("stochastic", [False, True], ids=ROUNDING_IDS)
@pytest.mark.parametrize("l2", [0.0, 0.3], ids=["no_l2", "l2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_storage_rounds_like_the_reference(dtype, kind, l2, stochastic):
    check_half_storage_rounds_like_the_reference(half_maker(kind, l2), dtype, kind, stochastic)


@pytest.mark.parametrize("kind,l2", [("sgd", 0.0), ("adam", 0.1)])
@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_half_storage_on_big_batches_and_threads(dtype, kind, l2):
    """test_big_batches_on_threads' tables and batches, two threads (several update tasks), stochastic."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_half_storage_rounds_like_the_reference(half_maker(kind, l2, BIG_SHAPES), dtype, kind, True,
                                                     steps=2, shapes=BIG_SHAPES, batch=BIG_BATCH,
                                                     max_bag=BIG_MAX_BAG)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", HALF, ids=HALF_IDS)
def test_sub_ulp_updates_survive_stochastic_rounding(dtype):
    check_sub_ulp_updates_survive(half_maker(), dtype)


def test_half_storage_buffers_salt_and_bad_dtype():
    tbe = CpuTBE(SHAPES, OptimSpec("adam", **OPTIM), dtype=torch.bfloat16)
    assert tbe.weights.dtype == torch.bfloat16 and tbe.exp_avg.dtype == torch.float32
    assert all(w.dtype == torch.bfloat16 for w in tbe.table_weights())
    assert tbe.salt == 0 and tbe.stochastic_rounding
    train_step(tbe, *make_batch(seed=1, weighted=False))
    assert tbe.salt == 1  # one more after each backward
    tbe.set_salt(41)
    train_step(tbe, *make_batch(seed=2, weighted=False))
    assert tbe.salt == 42
    with pytest.raises(ValueError, match="torch.float64"):
        CpuTBE(SHAPES, OptimSpec("sgd", lr=0.1), dtype=torch.float64)
