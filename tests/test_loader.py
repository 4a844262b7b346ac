"""The loader's per-rank partition: every row exactly once per epoch, independent of the world size."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distrec.data.loader import Columns, ParquetLoader
from distrec.data.manifest import DataError

ROWS = 1000
COLUMNS = Columns("label", ["rowid"], ["one", "bag"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three files, odd row groups; 'rowid' identifies a row, 'bag' has rowid % 3 ids (empty bags too)."""
    root = tmp_path_factory.mktemp("loader")
    paths, start = [], 0
    for i, n in enumerate([400, 350, 250]):
        rowid = np.arange(start, start + n)
        bags = [[r * 10 + k for k in range(r % 3)] for r in rowid]
        table = pa.table({"label": (rowid % 2).astype(np.float32), "rowid": rowid.astype(np.float32),
                          "one": rowid % 13, "bag": pa.array(bags, pa.list_(pa.int64()))})
        paths.append(root / f"part-{i}.parquet")
        pq.write_table(table, paths[-1], row_group_size=37)
        start += n
    return paths


def loaders(files, world, **kw):
    kw.setdefault("global_batch_size", 120)  # 120 on 7 ranks is uneven: covered below
    return [ParquetLoader(files, COLUMNS, rank=r, world_size=world, seed=3, prefetch_batches=2, **kw)
            for r in range(world)]


def rowids(batch):
    return batch.dense[:, 0].long().tolist()


def check_batch_contents(batch):
    ids = rowids(batch)
    n = len(ids)
    assert batch.sparse.keys == ["one", "bag"]
    lengths = batch.sparse.lengths.view(2, n)
    assert lengths[0].tolist() == [1] * n
    assert lengths[1].tolist() == [r % 3 for r in ids]
    one = batch.sparse.values[:n].tolist()
    assert one == [r % 13 for r in ids]
    assert batch.sparse.values[n:].tolist() == [r * 10 + k for r in ids for k in range(r % 3)]
    assert batch.labels.tolist() == [float(r % 2) for r in ids]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_row_exactly_once_including_the_last_partial_batch(files, world):
    seen = []
    for loader in loaders(files, world):
        assert loader.num_batches() == 9  # 8 full batches of 120 + 40 rows
        for batch in loader.epoch(0):
            check_batch_contents(batch)
            seen += rowids(batch)
    assert sorted(seen) == list(range(ROWS))


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_global_batches_do_not_depend_on_world_size(files, world):
    single = [sorted(rowids(b)) for b in loaders(files, 1)[0].epoch(1)]
    per_rank = [list(loader.epoch(1)) for loader in loaders(files, world)]
    for i, whole in enumerate(single):
        parts = [rowids(batches[i]) for batches in per_rank]
        assert sorted(sum(parts, [])) == whole
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # the partial batch is split evenly


def test_drop_last_drops_only_the_partial_batch(files):
    loader = loaders(files, 2, drop_last=True)[0]
    assert loader.num_batches() == 8
    assert sum(len(b) for b in loader.epoch(0)) == 8 * 60


def test_order_is_deterministic_per_seed_and_epoch(files):
    a, b = loaders(files, 1)[0], loaders(files, 1)[0]
    first = [rowids(x) for x in a.epoch(0)]
    assert first == [rowids(x) for x in b.epoch(0)]
    assert first != [rowids(x) for x in a.epoch(1)]
    plain = ParquetLoader(files, COLUMNS, global_batch_size=120, shuffle=False)
    assert sum((rowids(x) for x in plain.epoch(0)), []) == list(range(ROWS))


def test_starting_mid_epoch_gives_the_remaining_batches(files):
    loader = loaders(files, 2)[1]
    full = [rowids(x) for x in loader.epoch(2)]
    assert [rowids(x) for x in loader.epoch(2, start_batch=5)] == full[5:]


def test_max_rows_and_without_prefetch(files):
    loader = ParquetLoader(files, COLUMNS, global_batch_size=64, shuffle=False, prefetch_batches=0, max_rows=100)
    assert loader.num_rows == 100
    assert sum((rowids(x) for x in loader.epoch(0)), []) == list(range(100))


def test_each_batch_names_the_row_groups_it_came_from(files):
    """Row groups of 37 rows: part-0 (400 rows) has groups 0-10, the last of 30 rows."""
    on = lambda f: str(files[f])
    one = ParquetLoader(files, COLUMNS, global_batch_size=120, shuffle=False, prefetch_batches=0)
    origins = [b.sparse.origin for b in one.epoch(0)]
    assert origins[0] == f"{on(0)} row groups 0-3"  # rows 0-119
    assert origins[3] == f"{on(0)} row groups 9-10, {on(1)} row groups 0-2"  # rows 360-479 cross a file
    rank1 = ParquetLoader(files, COLUMNS, global_batch_size=120, rank=1, world_size=2, shuffle=False,
                          prefetch_batches=0)
    assert next(rank1.epoch(0)).sparse.origin == f"{on(0)} row groups 1-3"  # rows 60-119
    small = ParquetLoader(files, COLUMNS, global_batch_size=30, shuffle=False, prefetch_batches=0)
    assert next(small.epoch(0)).sparse.origin == f"{on(0)} row group 0"  # rows 0-29
    assert next(iter(one.epoch(0))).to("cpu").sparse.origin == origins[0]


def test_errors_name_the_problem(files, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet metadata"):
        ParquetLoader([bad], COLUMNS, global_batch_size=8)
    with pytest.raises(DataError, match=r"part-0\.parquet: no column\(s\) nope \(the file has label, rowid"):
        ParquetLoader(files, Columns("label", ["nope"], ["one"]), global_batch_size=8)


def test_an_error_in_the_background_thread_reaches_the_consumer():
    from distrec.data.loader import _background

    def items():
        yield 1
        raise DataError("part-7.parquet: broken row group")

    got = _background(items(), depth=2)
    assert next(got) == 1
    with pytest.raises(DataError, match="part-7.parquet: broken row group"):
        next(got)
