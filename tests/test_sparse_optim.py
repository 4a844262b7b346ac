"""SparseOptimizer against torch's own sparse optimizers, a plain row-wise Adagrad, and fbgemm.

Lookups only draw rows below TOUCHABLE, so the last rows of every table are never
touched, and repeat ids inside and across bags, so the sparse grads carry duplicates.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from sharding.optim import KINDS, SparseOptimizer, state_names
from tests.tolerance import assert_within, sum_tol

ROWS, WIDTH, TOUCHABLE = 50, 6, 40
LR, EPS, BETAS = 0.05, 1e-8, (0.9, 0.999)
# Tolerances (tests/tolerance.py). Both sides get the same sparse gradient from the same backward; they
# differ in how they add up a row's duplicate ids (coalesce, index_add_, fbgemm's kernel) and in the order
# of the elementwise update. A row's gradient sums at most one step's ids, IDS_PER_STEP = 8 bags * 4 + 3
# repeats, each term an upstream value; the update then takes <= 4 elementwise ops (square, add, sqrt,
# divide): n = IDS_PER_STEP + 4 per step. The magnitudes are measured per element (``Magnitudes``):
# - a weight: the sum over steps of how far each update moved it (each update's relative error is
#   <= n * EPS32 as long as its gradient is not within rounding of 0: seeded data), plus one rounding
#   of |w| per step for w - update;
# - a sum of gradients (Adagrad's G, Adam's moments): the sum over steps of each gradient's terms'
#   magnitudes sum|upstream| (squared for G and Adam's second moment: 2n per step).
# Over 5 steps a weight is held to ~5e-5 * movement + 1.2e-6 * |w| (|w| <= 4, movement <= 5 * LR for the
# Adagrads): <= 2e-5; a missed update moves an element by a whole update (~LR = 0.05 for the Adagrads
# and Adam, LR * |g| >= 1e-3 for SGD), a wrong row by ~|w| ~ 1.
IDS_PER_STEP = 8 * 4 + 3
N_STEP = IDS_PER_STEP + 4


def lookups(steps: int, seed: int = 0, rows: int = TOUCHABLE):
    """Per step: (ids, offsets, upstream grad of the pooled output); ids repeat."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(1, 5, (8,), generator=gen)
        ids = torch.randint(0, rows, (int(lengths.sum()),), generator=gen)
        ids = torch.cat([ids, ids[:3]])  # the last bag repeats ids of the first
        lengths[-1] += 3
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        out.append((ids, offsets, torch.randn(8, WIDTH, generator=gen)))
    return out


def table(width: int = WIDTH, seed: int = 1) -> torch.nn.Parameter:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(ROWS, width, generator=gen))


def backward(weight: torch.nn.Parameter, ids, offsets, upstream) -> None:
    weight.grad = None
    pooled = F.embedding_bag(ids, weight, offsets, mode="sum", sparse=True)
    (pooled * upstream[:, : weight.shape[1]]).sum().backward()


class RowwiseAdagradReference:
    """Textbook row-wise Adagrad: densify the grad, loop over the rows it names."""

    def __init__(self, weight, lr, eps):
        self.weight, self.lr, self.eps = weight, lr, eps
        self.row_sum = torch.zeros(weight.shape[0])

    @torch.no_grad()
    def step(self):
        grad = self.weight.grad
        dense = grad.to_dense()
        for r in grad.coalesce().indices()[0].tolist():
            self.row_sum[r] += (dense[r] ** 2).mean()
            self.weight[r] -= self.lr * dense[r] / (self.row_sum[r].sqrt() + self.eps)


def reference(kind: str, weight):
    if kind == "sgd":
        return torch.optim.SGD([weight], lr=LR)
    if kind == "adagrad":
        return torch.optim.Adagrad([weight], lr=LR, eps=EPS)
    if kind == "adam":
        return torch.optim.SparseAdam([weight], lr=LR, betas=BETAS, eps=EPS)
    return RowwiseAdagradReference(weight, LR, EPS)


class Magnitudes:
    """Per element, what a run's float32 errors scale with: ``start`` |w|, ``moved`` the sum over steps
    of |each update|, ``grad`` the sum over steps of a row's gradient terms' magnitudes."""

    def __init__(self, weight):
        self.start = weight.detach().abs().clone()
        self.moved = torch.zeros_like(self.start)
        self.grad = torch.zeros_like(self.start)
        self.steps = 0

    def add(self, before, weight, ids, offsets, upstream) -> None:
        self.moved += (weight.detach() - before).abs()
        scratch = torch.nn.Parameter(torch.zeros_like(weight))  # the same backward on |upstream|: sum|terms|
        backward(scratch, ids, offsets, upstream.abs())
        self.grad += scratch.grad.to_dense()
        self.steps += 1

    def weight_tol(self):
        return sum_tol(self.moved, self.steps * N_STEP) + sum_tol(self.start + self.moved, self.steps)

    def state_tol(self, squared: bool, per_row: bool = False):
        mag = self.grad ** 2 if squared else self.grad
        mag = mag.max(1).values if per_row else mag
        return sum_tol(mag, self.steps * (2 * N_STEP if squared else N_STEP))


def run(opt, weight, batches) -> Magnitudes:
    mag = Magnitudes(weight)
    for ids, offsets, upstream in batches:
        before = weight.detach().clone()
        backward(weight, ids, offsets, upstream)
        opt.step()
        mag.add(before, weight, ids, offsets, upstream)
    return mag


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind):
    ours, theirs = table(), table()
    batches = lookups(5)
    run(SparseOptimizer([ours], kind, lr=LR, eps=EPS, betas=BETAS), ours, batches)
    mag = run(reference(kind, theirs), theirs, batches)
    assert_within(ours.data, theirs.data, mag.weight_tol(), f"{kind} weights")


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_state(kind):
    ours, theirs = table(), table()
    batches = lookups(4)
    opt, ref = SparseOptimizer([ours], kind, lr=LR, eps=EPS, betas=BETAS), reference(kind, theirs)
    run(opt, ours, batches)
    mag = run(ref, theirs, batches)
    if kind == "adagrad":
        assert_within(opt.state[ours]["sum"], ref.state[theirs]["sum"], mag.state_tol(squared=True), "sum")
    elif kind == "rowwise_adagrad":
        assert_within(opt.state[ours]["row_sum"], ref.row_sum, mag.state_tol(squared=True, per_row=True), "row_sum")
    elif kind == "adam":
        for name, squared in (("exp_avg", False), ("exp_avg_sq", True)):
            assert_within(opt.state[ours][name], ref.state[theirs][name], mag.state_tol(squared), name)
        assert int(opt.state[ours]["step"]) == ref.state[theirs]["step"] == len(batches)


@pytest.mark.parametrize("kind", KINDS)
def test_untouched_rows_never_change(kind):
    weight = table()
    before = weight.detach().clone()
    batches = lookups(4, seed=3)
    opt = SparseOptimizer([weight], kind, lr=LR)
    run(opt, weight, batches)
    touched = torch.zeros(ROWS, dtype=torch.bool)
    for ids, _, _ in batches:
        touched[ids] = True
    assert not touched[TOUCHABLE:].any()
    assert torch.equal(weight.data[~touched], before[~touched])
    assert not torch.equal(weight.data[touched], before[touched])
    for name, rule in state_names(kind).items():
        if rule != "scalar":
            assert not opt.state[weight][name][~touched].any(), name


@pytest.mark.parametrize("kind", KINDS)
def test_state_names_describe_state(kind):
    weight = table()
    opt = SparseOptimizer([weight], kind, lr=LR)
    run(opt, weight, lookups(1))
    state = opt.state[weight]
    assert set(state) == set(state_names(kind))
    shapes = {"row_col": (ROWS, WIDTH), "row": (ROWS,), "scalar": ()}
    for name, rule in state_names(kind).items():
        assert tuple(state[name].shape) == shapes[rule], name


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    batches = lookups(4, seed=5)
    straight = table()
    run(SparseOptimizer([straight], kind, lr=LR), straight, batches)

    first = table()
    opt = SparseOptimizer([first], kind, lr=LR)
    run(opt, first, batches[:2])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # through serialization, as a checkpoint would
    buf.seek(0)

    resumed = torch.nn.Parameter(first.detach().clone())
    opt2 = SparseOptimizer([resumed], kind, lr=LR)
    opt2.load_state_dict(torch.load(buf))
    run(opt2, resumed, batches[2:])
    assert torch.equal(resumed.data, straight.data)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_grad_touches_nonzero_rows(kind):
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(ROWS, WIDTH, generator=gen)
    grad[::3] = 0.0  # zero rows count as untouched
    dense_w, sparse_w = table(), table()
    before = dense_w.detach().clone()
    rows = grad.ne(0).any(1).nonzero().squeeze(1)
    dense_w.grad = grad.clone()
    sparse_w.grad = torch.sparse_coo_tensor(rows[None], grad[rows], (ROWS, WIDTH))
    opt_d = SparseOptimizer([dense_w], kind, lr=LR)
    opt_s = SparseOptimizer([sparse_w], kind, lr=LR)
    for _ in range(2):
        opt_d.step()
        opt_s.step()
    assert torch.equal(dense_w.data, sparse_w.data)
    assert torch.equal(dense_w.data[::3], before[::3])


def test_param_without_grad_is_skipped():
    used, unused = table(), table(seed=2)
    before = unused.detach().clone()
    opt = SparseOptimizer([used, unused], "adam", lr=LR)
    run(opt, used, lookups(2))
    assert unused.grad is None
    assert torch.equal(unused.data, before)
    assert unused not in opt.state
    assert int(opt.state[used]["step"]) == 2


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        SparseOptimizer([table()], "lamb", lr=LR)
    with pytest.raises(ValueError, match="kind"):
        state_names("lamb")


# fbgemm's CPU kernels (codegen/genscript/optimizers.py, split_weight_update_cpu) use the
# same convention as ours, eps OUTSIDE the square root:
#   EXACT_ADAGRAD:          m += g*g;           w -= lr * g / (sqrt(m) + eps)
#   EXACT_ROWWISE_ADAGRAD:  m += sum(g*g) / D;  w -= g * (lr / (sqrtf(m) + eps))
# A large eps makes the check meaningful: with eps inside the sqrt (1/sqrt(s + eps)) the
# results would differ by several percent, far beyond the tolerance.
FBGEMM_EPS = 0.1


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad"])
def test_matches_fbgemm_cpu_tbe(kind):
    pytest.importorskip("fbgemm_gpu")
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        ComputeDevice, EmbeddingLocation)
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        OptimType, SplitTableBatchedEmbeddingBagsCodegen)

    optim_type = {"sgd": OptimType.EXACT_SGD, "adagrad": OptimType.EXACT_ADAGRAD,
                  "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD}[kind]
    width = 8  # fbgemm TBE needs a multiple of 4
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(ROWS, width, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=optim_type, learning_rate=LR, eps=FBGEMM_EPS)
    ours = table(width=width)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(ours)
    opt = SparseOptimizer([ours], kind, lr=LR, eps=FBGEMM_EPS)
    mag = Magnitudes(ours)

    for ids, offsets, upstream in lookups(4, seed=11):
        upstream = torch.cat([upstream, upstream[:, :2]], dim=1)  # widen to 8 columns
        # fbgemm takes B + 1 offsets (the total appended); embedding_bag takes B.
        tbe_offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
        tbe(ids, tbe_offsets).backward(upstream)  # backward applies fbgemm's fused update
        before = ours.detach().clone()
        backward(ours, ids, offsets, upstream)
        opt.step()
        mag.add(before, ours, ids, offsets, upstream)

    assert_within(tbe.split_embedding_weights()[0], ours.data, mag.weight_tol(), f"{kind} weights")
    if kind != "sgd":
        name = "sum" if kind == "adagrad" else "row_sum"
        fb_state = tbe.split_optimizer_states()[0][0].view_as(opt.state[ours][name])
        assert_within(fb_state, opt.state[ours][name], mag.state_tol(True, per_row=kind != "adagrad"), name)
