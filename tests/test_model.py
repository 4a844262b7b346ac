"""The fused single-process model against the plain reference DLRM."""
import copy

import pytest
import torch

from distrec.config import TableSpec
from distrec.model.dlrm import DLRM
from distrec.model.embedding import IdRangeError
from sharding.jagged import JaggedBatch
from tests.reference_model import LocalEmbeddings, ReferenceDLRM
from tests.tolerance import C, assert_within, sum_tol


def specs(dims=(8, 8, 8), rows=(30, 5, 100), pooling="sum"):
    return [TableSpec(f"f{i}", r, d, pooling, 1.1, 1) for i, (r, d) in enumerate(zip(rows, dims))]


def random_batch(table_specs, batch, max_len=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    values, lengths = [], []
    for s in table_specs:
        n = torch.randint(0, max_len + 1, (batch,), generator=g)  # includes empty bags
        lengths.append(n)
        values.append(torch.randint(0, s.num_rows, (int(n.sum()),), generator=g))
    return JaggedBatch.from_per_key([s.name for s in table_specs], values, lengths)


def build(table_specs, num_dense=4, interaction="dot", low_rank=0, seed=0):
    torch.manual_seed(seed)
    dim = table_specs[0].dim
    return DLRM(num_dense, LocalEmbeddings(table_specs), [16, dim], [12, 6], interaction, 2, low_rank)


CASES = [
    dict(),
    dict(pooling="mean"),
    dict(num_dense=0),
    dict(interaction="dcn", dims=(8, 4, 6)),
    dict(interaction="dcn", low_rank=3, num_dense=0),
]


def magnitudes(ref, dense, sparse):
    """The reference run on |parameters| and |inputs|: every output (and, through backward, every
    gradient) becomes the sum of the magnitudes of all the terms that went into it, through every layer
    (sums and products of non-negative values, and ReLU on them, keep it an upper bound). These are the
    sum|x| of tests/tolerance.py for the whole network, to first order.
    (output magnitudes, each table's gradient magnitudes, the top MLP's gradient magnitudes)"""
    absref = copy.deepcopy(ref)
    with torch.no_grad():
        for p in absref.parameters():
            p.abs_()
    out = absref(dense.abs(), sparse)
    out.sum().backward()
    return out.detach(), [b.weight.grad for b in absref.tables], [p.grad for p in absref.top.parameters()]


def accumulated_terms(model, batch, max_len):
    """Bounds on the terms summed along any path from an input to the output (forward: every Linear's
    fan-in, a bag's ids, the interaction's dot of two dim-long vectors; a cross layer's Linears count
    with the rest) and on to a gradient (backward adds every Linear's fan-out and a row's uses over the
    batch): (forward, forward + backward)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    forward = sum(m.in_features for m in linears) + max_len + max(model.embeddings.dims)
    return forward, forward + sum(m.out_features for m in linears) + batch * max_len


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "dot")
def test_fused_model_matches_reference_forward_and_backward(case):
    case = dict(case)
    tspecs = specs(case.pop("dims", (8, 8, 8)), pooling=case.pop("pooling", "sum"))
    model = build(tspecs, **case)
    ref = ReferenceDLRM.from_model(model)
    dense = torch.randn(17, case.get("num_dense", 4))
    sparse = random_batch(tspecs, 17)
    out, want = model(dense, sparse), ref(dense, sparse)
    # Same sums in other orders (one fused embedding_bag vs one per table, a batched interaction vs a loop
    # over pairs, rows' gradients added over the batch in another order): n = 32-127 terms forward and
    # 102-273 with backward in these cases, so each value is held to 8e-6 - 7e-5 of its magnitude from
    # magnitudes() (a median 6-130 times the value itself: the bound lets every term's error add up).
    # Measured: exchanging two rows a lookup uses moves a logit by 2-700 times its bound, and a lost or
    # misplaced gradient term changes a row's gradient by the whole term.
    n_forward, n = accumulated_terms(model, 17, 3)
    mag_out, mag_tables, mag_top = magnitudes(ref, dense, sparse)
    assert_within(out, want, sum_tol(mag_out, n_forward), "logits")
    out.sum().backward()
    want.sum().backward()
    for i, bag in enumerate(ref.tables):
        grad = model.embeddings.weights[model.embeddings.groups.index(tspecs[i].dim)].grad
        start = sum(s.num_rows for s in tspecs[:i] if s.dim == tspecs[i].dim)
        assert_within(grad[start:start + tspecs[i].num_rows], bag.weight.grad, sum_tol(mag_tables[i], n),
                      f"table {tspecs[i].name} gradient")
    for a, b, mag in zip(model.top.parameters(), ref.top.parameters(), mag_top):
        assert_within(a.grad, b.grad, sum_tol(mag, n), "top MLP gradient")


# bf16 keeps 8 significant bits, fp16 11: each rounding moves a value by at most eps / 2 of itself.
EPS_HALF = {"bf16": torch.finfo(torch.bfloat16).eps, "fp16": torch.finfo(torch.float16).eps}


def half_roundings(model) -> int:
    """Roundings to the half type along any path from an input to the logit under autocast: each Linear
    rounds its input, its weight and its output, and the interaction's products their two inputs and the
    result."""
    return 3 * (sum(isinstance(m, torch.nn.Linear) for m in model.modules()) + 1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:4], ids=["dot", "mean", "dcn"])
def test_half_compute_is_fp32_within_its_roundings_with_fp32_logits_and_gradients(case, precision):
    """train.precision = "bf16" or "fp16": the dense part under that autocast. To first order, k roundings
    of relative size eps / 2 each move the logit by at most k * eps / 2 of its magnitude (magnitudes(): the
    sum of |terms| through every layer), and backward rounds as many again; C = 2 (tests/tolerance.py) takes
    the second-order terms. The bound is every rounding going the same way; measured, the logits use ~0.1 %
    of it. And they must differ from the same model's fp32 logits, or autocast did not run; bf16's, by more
    than fp32's own bound somewhere (fp16's roundings, 8x finer, can stay inside that loose bound).
    (The values here are far inside fp16's range: no loss scaling is needed to compare them.)"""
    case = dict(case)
    tspecs = specs(case.pop("dims", (8, 8, 8)), pooling=case.pop("pooling", "sum"))
    model = build(tspecs, **case)
    model.precision = precision
    eps = EPS_HALF[precision]
    ref = ReferenceDLRM.from_model(model)
    dense, sparse = torch.randn(17, case.get("num_dense", 4)), random_batch(tspecs, 17)
    out, want = model(dense, sparse), ref(dense, sparse)
    n_forward, n = accumulated_terms(model, 17, 3)
    mag_out, mag_tables, mag_top = magnitudes(ref, dense, sparse)
    k = half_roundings(model)
    assert out.dtype == torch.float32
    assert_within(out, want, C * k * eps / 2 * mag_out + sum_tol(mag_out, n_forward), f"{precision} logits")
    model.precision = "fp32"
    assert not torch.equal(out, model(dense, sparse)), f"{precision} autocast did not change the logits"
    model.precision = precision
    if precision == "bf16":
        assert ((out - want).abs() > sum_tol(mag_out, n_forward)).any(), "bf16 changed the logits too little"
    out.sum().backward()
    want.sum().backward()
    for i, bag in enumerate(ref.tables):
        grad = model.embeddings.weights[model.embeddings.groups.index(tspecs[i].dim)].grad
        start = sum(s.num_rows for s in tspecs[:i] if s.dim == tspecs[i].dim)
        assert grad.dtype == torch.float32  # the tables and their updates stay fp32
        assert_within(grad[start:start + tspecs[i].num_rows], bag.weight.grad,
                      C * 2 * k * eps / 2 * mag_tables[i] + sum_tol(mag_tables[i], n), f"table {i} gradient")
    for a, b, mag in zip(model.top.parameters(), ref.top.parameters(), mag_top):
        assert a.dtype == a.grad.dtype == torch.float32
        assert_within(a.grad, b.grad, C * 2 * k * eps / 2 * mag + sum_tol(mag, n), "top MLP gradient")


def test_per_sample_weights_scale_each_id():
    tspecs = specs()
    emb = LocalEmbeddings(tspecs)
    sparse = random_batch(tspecs, 5, seed=1)
    weights = torch.rand(sparse.values.numel())
    sparse.weights = weights
    pooled = emb(sparse)
    want, pos = [], 0
    for t in range(3):
        table = emb.table_weight(t)
        for b in range(5):
            n = int(sparse.lengths[t * 5 + b])
            ids, w = sparse.values[pos:pos + n], weights[pos:pos + n]
            want.append((table[ids] * w[:, None]).sum(0))
            pos += n
    want = torch.stack(want).view(3, 5, 8).permute(1, 0, 2).reshape(5, 24)
    torch.testing.assert_close(pooled, want)


def test_id_out_of_range_names_feature_and_table():
    tspecs = specs()
    model = build(tspecs)
    sparse = JaggedBatch.from_dense(["f0", "f1", "f2"], torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(IdRangeError, match="feature f1: id 5 is out of range for table f1 with 5 rows"):
        model(torch.randn(2, 4), sparse)
    sparse = JaggedBatch.from_dense(["f0", "f1", "f2"], torch.tensor([[-1, 2, 3]]))
    with pytest.raises(IdRangeError, match="feature f0: id -1"):
        model(torch.randn(1, 4), sparse)
    sparse.origin = "data/part-00003.parquet row group 2"  # as the loader sets it
    with pytest.raises(IdRangeError, match=r"feature f0: id -1 .* rows in data/part-00003\.parquet row group 2$"):
        model(torch.randn(1, 4), sparse)


def test_empty_local_batch_runs_forward_and_backward():
    tspecs = specs()
    model = build(tspecs)
    sparse = JaggedBatch.from_dense(["f0", "f1", "f2"], torch.zeros(0, 3, dtype=torch.int64))
    out = model(torch.zeros(0, 4), sparse)
    assert out.shape == (0,)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_jagged_batch_round_trips_through_keyed_jagged_tensor():
    jb = random_batch(specs(), 6, seed=2)
    jb.weights = torch.rand(jb.values.numel())
    back = JaggedBatch.from_kjt(jb.to_kjt())
    assert back.keys == jb.keys
    assert torch.equal(back.values, jb.values) and torch.equal(back.lengths, jb.lengths)
    assert torch.equal(back.weights, jb.weights)
