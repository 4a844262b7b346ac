import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distrec.config import load_config
from distrec.data.manifest import read_manifest
from distrec.tools.data.synth import synthesize, zipf_ids
from tests.conftest import write_config


def _read_all(data_dir, split):
    m = read_manifest(data_dir)
    return [pq.read_table(data_dir / f) for f in m["splits"][split]["files"]]


def test_same_seed_same_bytes_of_data(tmp_path, small_data):
    cfg_path, first = small_data
    again = synthesize(load_config(str(cfg_path)), tmp_path / "again")
    assert again == read_manifest(first)
    for a, b in zip(_read_all(first, "train") + _read_all(first, "valid"),
                    _read_all(tmp_path / "again", "train") + _read_all(tmp_path / "again", "valid")):
        assert a.equals(b)


def test_other_seed_other_data(tmp_path, small_data):
    cfg_path, first = small_data
    other = synthesize(load_config(str(cfg_path), ["--synth.seed=8"]), tmp_path / "other")
    assert other["seed"] == 8
    assert not _read_all(first, "train")[0].equals(_read_all(tmp_path / "other", "train")[0])


def test_manifest_schema_rows_and_shapes(small_data):
    _, data = small_data
    m = read_manifest(data)
    assert m["schema"] == {"label": "label", "dense": ["d1", "d2", "d3"], "categorical": ["c1", "c2", "c3", "c4"]}
    assert m["splits"]["train"]["rows"] == 6000 and len(m["splits"]["train"]["files"]) == 3
    tables = _read_all(data, "train")
    assert sum(t.num_rows for t in tables) == 6000
    t = tables[0]
    assert pq.ParquetFile(data / m["splits"]["train"]["files"][0]).metadata.row_group(0).num_rows == 500
    c2 = t["c2"].to_pylist()  # hotness 3: variable bags of 1..3 ids
    assert {len(bag) for bag in c2} == {1, 2, 3}
    for name, rows in m["cardinalities"].items():
        ids = np.concatenate([np.asarray(t[name].combine_chunks().flatten() if name == "c2" else t[name]) for t in tables])
        assert ids.min() >= 0 and ids.max() < rows
    assert set(np.unique(t["label"].to_numpy())) <= {0.0, 1.0}


def test_default_teacher_is_calibrated_like_real_ctr_data(tmp_path):
    cfg = load_config(None, ["--synth.train_rows=1000", "--synth.eval_rows=100000", "--synth.rows_per_file=50000"])
    m = synthesize(cfg, tmp_path / "d")
    assert 0.03 <= m["click_rate"] <= 0.25
    assert 0.75 <= m["bayes_auc"] <= 0.85
    assert abs(m["bayes_auc"] - cfg.synth.target_auc) < 0.01


def test_zipf_ids_follow_the_power_law():
    rng = np.random.default_rng(0)
    ids = zipf_ids(rng, 400_000, 1000, 1.2)
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.sort(np.bincount(ids, minlength=1000))[::-1]
    ranks = np.arange(1, 1001)
    expected = ranks ** -1.2 / np.sum(ranks ** -1.2) * ids.size
    # The head follows k^-s closely (the continuous approximation is exact to a few percent there).
    np.testing.assert_allclose(counts[:5], expected[:5], rtol=0.25)
    assert counts[0] > 20 * counts[500]


def test_multi_hot_columns_are_lists(tmp_path):
    cfg_path = write_config(tmp_path / "c.toml")
    cfg = load_config(str(cfg_path), ["--synth.train_rows=100", "--synth.eval_rows=100"])
    synthesize(cfg, tmp_path / "d")
    t = _read_all(tmp_path / "d", "train")[0]
    assert pa.types.is_list(t.schema.field("c2").type) and t.schema.field("c2").type.value_type == pa.int64()
    assert str(t.schema.field("c1").type) == "int64"
