import pytest

from distrec.config import ConfigError, dump_toml, load_config, parse_overrides, table_specs
from tests.conftest import write_config


def test_defaults_are_the_criteo_preset():
    cfg = load_config(None)
    assert len(cfg.schema.dense) == 13 and len(cfg.schema.categorical) == 26
    assert cfg.schema.dense[0] == "I1" and cfg.schema.categorical[-1] == "C26"


def test_file_then_command_line_overrides(tmp_path):
    path = write_config(tmp_path / "c.toml")
    cfg = load_config(str(path), ["--train.global_batch_size=512", "--model.top_mlp", "[32, 16]",
                                  "--optimizer.dense_lr=1", "--tables.pooling=mean", "--logging.dir=out"])
    assert cfg.train.global_batch_size == 512
    assert cfg.model.top_mlp == [32, 16]
    assert cfg.optimizer.dense_lr == 1.0 and isinstance(cfg.optimizer.dense_lr, float)
    assert cfg.tables.pooling == "mean"
    assert cfg.logging.dir == "out"
    assert cfg.schema.dense == ["d1", "d2", "d3"]  # from the file


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nbottom_mlpp = [8]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown key 'model\.bottom_mlpp' \(did you mean 'model\.bottom_mlp'\?\)"):
        load_config(str(path))


def test_unknown_section_and_wrong_type(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[trian]\nseed = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown section \[trian\] \(did you mean \[train\]\?\)"):
        load_config(str(path))
    path.write_text('[train]\nseed = "one"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: train\.seed: expected int, got str 'one'"):
        load_config(str(path))


def test_command_line_errors():
    with pytest.raises(ConfigError, match=r"command line --train\.epochs: train\.epochs: expected int, got float 1\.5"):
        load_config(None, ["--train.epochs=1.5"])
    with pytest.raises(ConfigError, match=r"command line --model\.top_mlp: model\.top_mlp\[1\]: expected int"):
        load_config(None, ['--model.top_mlp=[8, "x"]'])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.sede'"):
        load_config(None, ["--train.sede=1"])
    with pytest.raises(ConfigError, match=r"expected --section\.key=value"):
        load_config(None, ["train.seed=1"])
    with pytest.raises(ConfigError, match=r"optimizer\.dense = 'lamb' is not one of sgd, adagrad, adam"):
        load_config(None, ["--optimizer.dense=lamb"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(str(tmp_path / "nope.toml"))
    (tmp_path / "broken.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_config(str(tmp_path / "broken.toml"))


def test_table_list_length_and_dot_dims_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"tables\.cardinalities has 2 entries but the schema has 26"):
        load_config(None, ["--tables.cardinalities=[1, 2]"])
    with pytest.raises(ConfigError, match=r"bottom_mlp must end in the embedding dim 32"):
        load_config(None, ["--tables.dim=32"])


def test_zero_dense_schema_and_per_table_specs(tmp_path):
    cfg = load_config(str(write_config(tmp_path / "c.toml")), ["--schema.dense=[]"])
    assert cfg.schema.dense == []
    specs = table_specs(cfg)
    assert [(s.name, s.num_rows, s.hotness) for s in specs] == [
        ("c1", 50, 1), ("c2", 200, 3), ("c3", 7, 1), ("c4", 300, 1)]


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(str(write_config(tmp_path / "c.toml")), ["--train.seed=5"])
    (tmp_path / "resolved.toml").write_text(dump_toml(cfg))
    again = load_config(str(tmp_path / "resolved.toml"))
    again.source = cfg.source
    assert again == cfg


def test_parse_overrides_reads_toml_values():
    assert parse_overrides(["--a.b=3", "--a.c", "true", "--a.d=hello world", "--a.e=[1.5]"]) == [
        ("a", "b", 3), ("a", "c", True), ("a", "d", "hello world"), ("a", "e", [1.5])]
