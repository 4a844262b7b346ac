"""sharding.init's table inits (tables.init): each init's distribution, and any shard of a table equal
to the same rows and columns of the whole table, also through the runtime's lookup."""
import math

import pytest
import torch

from sharding.init import ROWS_PER_CHUNK, init_rows
from sharding.lookup import Placed, TorchLookup
from sharding.types import Shard, TableConfig

ROWS, DIM = ROWS_PER_CHUNK * 2 + 1000, 8  # three chunks, the last one partial


@pytest.mark.parametrize("init, std", [("uniform", 0.0), ("normal", 0.05), ("zeros", 0.0)])
def test_any_shard_is_the_same_cut_of_the_whole_table(init, std):
    whole = init_rows(3, 2, ROWS, DIM, (0, ROWS), (0, DIM), init, std)
    for rows, cols in [((1000, ROWS_PER_CHUNK + 7), (0, DIM)), ((0, ROWS), (2, 5)),
                       ((ROWS_PER_CHUNK * 2 - 1, ROWS), (5, 8)), ((17, 18), (0, 1))]:
        part = init_rows(3, 2, ROWS, DIM, rows, cols, init, std)
        assert torch.equal(part, whole[rows[0]:rows[1], cols[0]:cols[1]]), (rows, cols)


def test_distributions():
    n = ROWS * DIM
    assert torch.equal(init_rows(0, 0, ROWS, DIM, (0, ROWS), (0, DIM), "zeros"), torch.zeros(ROWS, DIM))
    # uniform(+-b), b = sqrt(1 / rows): every value within b, and the largest |x| above b (1 - 40 / n)
    # unless all n draws missed that band, probability (1 - 40 / n)^n < e^-40.
    u = init_rows(0, 0, ROWS, DIM, (0, ROWS), (0, DIM))
    bound = math.sqrt(1.0 / ROWS)
    assert float(u.abs().max()) <= bound and float(u.abs().max()) >= bound * (1 - 40 / n)
    # normal(0, s): the sample mean within 6 s / sqrt(n) of 0, the sample std within 6 s / sqrt(2 n) of
    # s (their standard errors; 6 of them: a chance below 1e-8 of failing for a correct draw).
    s = 0.05
    x = init_rows(0, 0, ROWS, DIM, (0, ROWS), (0, DIM), "normal", s)
    assert abs(float(x.mean())) <= 6 * s / math.sqrt(n)
    assert abs(float(x.std()) - s) <= 6 * s / math.sqrt(2 * n)
    # Different tables (and seeds) draw differently; the default is today's uniform bit for bit.
    assert not torch.equal(init_rows(0, 1, ROWS, DIM, (0, ROWS), (0, DIM), "normal", s), x)
    assert torch.equal(init_rows(0, 0, ROWS, DIM, (0, ROWS), (0, DIM), "uniform", 0.0), u)


def test_unknown_init_names_the_choices():
    with pytest.raises(ValueError, match="unknown table init 'ones'.*uniform, normal, zeros"):
        init_rows(0, 0, 10, 2, (0, 10), (0, 2), "ones")


def test_runtime_lookup_shards_use_each_tables_init():
    tables = [TableConfig("a", 50, 4, init="normal", init_std=0.1), TableConfig("b", 30, 4, init="zeros"),
              TableConfig("c", 20, 4)]
    placed = [Placed(0, Shard(0, 10, 35, 0, 4)), Placed(1, Shard(0, 0, 30, 0, 4)), Placed(2, Shard(0, 0, 20, 2, 4))]
    lookup = TorchLookup(placed, tables, seed=5, optim=None)
    w4 = lookup.weights[lookup.widths.index(4)]
    assert torch.equal(w4[:25], init_rows(5, 0, 50, 4, (0, 50), (0, 4), "normal", 0.1)[10:35])
    assert torch.equal(w4[25:55], torch.zeros(30, 4))
    w2 = lookup.weights[lookup.widths.index(2)]
    assert torch.equal(w2, init_rows(5, 2, 20, 4, (0, 20), (0, 4))[:, 2:4])
