"""distrec data libfm: libFM files -> TSV -> `data preprocess` -> the loader, field by field, and the
errors that name the file and line."""
from __future__ import annotations

import re

import pytest
import torch

from distrec.cli import main
from distrec.config import load_config
from distrec.data.loader import make_loader
from distrec.data.manifest import read_manifest
from distrec.tools.data.preprocess import preprocess
from distrec.trainer.dist import DistContext

TRAIN = ["1 3:1 10:1 21:1", "-1 4:1 10:1 20:1", "1 3:1 11:1 22:1", "-1 5:1 12:1 20:1"]
VALID = ["1 3:1 12:1 99:1", "-1 4:1 10:1 21:1"]  # 99: a tag never seen in training


def libfm_data(tmp_path):
    for name, lines in (("t.train.libfm", TRAIN), ("t.validation.libfm", VALID)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    assert main(["data", "libfm", "--in", str(tmp_path / "t.train.libfm"), str(tmp_path / "t.validation.libfm"),
                 "--out", str(tmp_path / "tsv")]) == 0
    preprocess([tmp_path / "tsv" / "t.train.tsv", tmp_path / "tsv" / "t.validation.tsv"], tmp_path / "data",
               split="file", valid_files=["t.validation.tsv"], workers=1, progress=False)
    cfg = load_config(None, ["--schema.preset=none", "--schema.dense=[]", '--schema.categorical=["C1","C2","C3"]',
                             f"--data.path={tmp_path / 'data'}", "--train.global_batch_size=8", "--tables.dim=4"])
    return cfg, read_manifest(cfg.data.path)


def ids_of(cfg, manifest, split):
    batch = next(iter(make_loader(cfg, manifest, split, DistContext(0, 1, 0, torch.device("cpu"), "none"), train=False).epoch(0)))
    per_key, _, _ = batch.sparse.per_key()
    return batch.labels, [ids.tolist() for ids in per_key]


def test_each_feature_becomes_its_field_and_labels_become_clicks(tmp_path):
    cfg, manifest = libfm_data(tmp_path)
    # ids per field: 0 missing, 1 unseen in training, 2.. the training values in order of their index
    assert {k: manifest["cardinalities"][k] for k in ("C1", "C2", "C3")} == {"C1": 5, "C2": 5, "C3": 5}
    labels, ids = ids_of(cfg, manifest, "train")
    assert labels.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert ids == [[2, 3, 2, 4], [2, 2, 3, 4], [3, 2, 4, 2]]  # users 3,4,3,5; items 10,10,11,12; tags 21,20,22,20
    labels, ids = ids_of(cfg, manifest, "valid")
    assert labels.tolist() == [1.0, 0.0] and ids == [[2, 3], [4, 2], [1, 3]]


@pytest.mark.parametrize("line,message", [
    ("1 3:1 10:1", r"t\.libfm:2: 2 features, the file's first line has 3"),
    ("2 3:1 10:1 20:1", r"t\.libfm:2: label '2' is not -1, 0 or 1"),
    ("1 3:0.5 10:1 20:1", r"t\.libfm:2: feature '3:0\.5' is not INDEX:1 \(one-hot\)"),
])
def test_a_line_of_another_shape_is_named(tmp_path, capsys, line, message):
    (tmp_path / "t.libfm").write_text(f"1 3:1 10:1 20:1\n{line}\n")
    assert main(["data", "libfm", "--in", str(tmp_path / "t.libfm"), "--out", str(tmp_path / "tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_files_with_different_field_counts_are_refused(tmp_path, capsys):
    (tmp_path / "a.libfm").write_text("1 3:1 10:1 20:1\n")
    (tmp_path / "b.libfm").write_text("1 3:1 10:1\n")
    assert main(["data", "libfm", "--in", str(tmp_path / "a.libfm"), str(tmp_path / "b.libfm"),
                 "--out", str(tmp_path / "tsv")]) == 2
    assert "different field counts [2, 3]" in capsys.readouterr().err
