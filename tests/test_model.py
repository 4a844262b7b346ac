"""The fused single-process model against the plain reference DLRM."""
import pytest
import torch

from distrec.config import TableSpec
from distrec.model.dlrm import DLRM
from distrec.model.embedding import IdRangeError
from sharding.jagged import JaggedBatch
from tests.reference_model import LocalEmbeddings, ReferenceDLRM


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


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "dot")
def test_fused_model_matches_reference_forward_and_backward(case):
    case = dict(case)
    tspecs = specs(case.pop("dims", (8, 8, 8)), pooling=case.pop("pooling", "sum"))
    model = build(tspecs, **case)
    ref = ReferenceDLRM.from_model(model)
    dense = torch.randn(17, case.get("num_dense", 4))
    sparse = random_batch(tspecs, 17)
    out, want = model(dense, sparse), ref(dense, sparse)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    want.sum().backward()
    for i, bag in enumerate(ref.tables):
        grad = model.embeddings.weights[model.embeddings.groups.index(tspecs[i].dim)].grad
        start = sum(s.num_rows for s in tspecs[:i] if s.dim == tspecs[i].dim)
        torch.testing.assert_close(grad[start:start + tspecs[i].num_rows], bag.weight.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.top.parameters(), ref.top.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


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
