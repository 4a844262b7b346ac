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

ROWS, WIDTH, TOUCHABLE = 50, 6, 40
LR, EPS, BETAS = 0.05, 1e-8, (0.9, 0.999)
TOL = dict(rtol=1e-6, atol=1e-6)


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


def run(opt, weight, batches) -> None:
    for ids, offsets, upstream in batches:
        backward(weight, ids, offsets, upstream)
        opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind):
    ours, theirs = table(), table()
    batches = lookups(5)
    run(SparseOptimizer([ours], kind, lr=LR, eps=EPS, betas=BETAS), ours, batches)
    run(reference(kind, theirs), theirs, batches)
    torch.testing.assert_close(ours.data, theirs.data, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_state(kind):
    ours, theirs = table(), table()
    batches = lookups(4)
    opt, ref = SparseOptimizer([ours], kind, lr=LR, eps=EPS, betas=BETAS), reference(kind, theirs)
    run(opt, ours, batches)
    run(ref, theirs, batches)
    if kind == "adagrad":
        torch.testing.assert_close(opt.state[ours]["sum"], ref.state[theirs]["sum"], **TOL)
    elif kind == "rowwise_adagrad":
        torch.testing.assert_close(opt.state[ours]["row_sum"], ref.row_sum, **TOL)
    elif kind == "adam":
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[ours][name], ref.state[theirs][name], **TOL)
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

    for ids, offsets, upstream in lookups(4, seed=11):
        upstream = torch.cat([upstream, upstream[:, :2]], dim=1)  # widen to 8 columns
        # fbgemm takes B + 1 offsets (the total appended); embedding_bag takes B.
        tbe_offsets = torch.cat([offsets, torch.tensor([ids.numel()])])
        tbe(ids, tbe_offsets).backward(upstream)  # backward applies fbgemm's fused update
        backward(ours, ids, offsets, upstream)
        opt.step()

    torch.testing.assert_close(tbe.split_embedding_weights()[0], ours.data, **TOL)
    if kind != "sgd":
        name = "sum" if kind == "adagrad" else "row_sum"
        fb_state = tbe.split_optimizer_states()[0][0].view_as(opt.state[ours][name])
        torch.testing.assert_close(fb_state, opt.state[ours][name], **TOL)
