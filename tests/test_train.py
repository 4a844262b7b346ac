"""The trainer in one process: logs, evaluation, checkpoints, resume, errors."""
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from distrec.train import main
from distrec.trainer import checkpoint as ckpt
from tests.conftest import run_cli


def args(cfg_path, data, tmp_path, *more):
    return ["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={tmp_path / 'logs'}", *more]


def records(log_dir, kind):
    return [r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_trains_logs_and_evaluates(small_data, tmp_path, capsys):
    cfg_path, data = small_data
    assert main(args(cfg_path, data, tmp_path, "--train.epochs=2", "--eval.every_steps=10",
                     "--train.log_every_steps=5")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("final: step 48 | auc ") and "samples/s | bayes auc" in out[-1]
    train = records(tmp_path / "logs", "train")
    assert [r["step"] for r in train] == list(range(5, 48, 5)) + [48]
    assert train[-1]["samples"] == 2 * 6000
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in train)
    evals = records(tmp_path / "logs", "eval")
    assert [r["step"] for r in evals] == [10, 20, 30, 40, 48]
    assert evals[-1]["rows"] == 2000
    assert evals[-1]["auc"] > evals[0]["auc"] - 0.02 and evals[-1]["auc"] > 0.6
    assert f"auc {evals[-1]['auc']:.4f}" in out[-1]
    assert "[train]" in (tmp_path / "logs" / "config.toml").read_text()


def _final_weights(ckpt_dir):
    state = ckpt.load_latest(ckpt_dir)
    shards = {f"{p['table']}{p['rows']}{p['cols']}": p["weight"] for p in state["shards"]}
    opt_state = {f"{p['table']}{p['rows']}/{k}": v for p in state["shards"] for k, v in p["state"].items()}
    return {**state["dense"], **shards, **opt_state}


def test_resume_continues_to_the_same_result(small_data, tmp_path):
    cfg_path, data = small_data
    common = ["--train.epochs=2", "--optimizer.dense=adam", "--optimizer.sparse=adagrad"]
    whole = tmp_path / "whole"
    assert main(args(cfg_path, data, whole, *common, f"--checkpoint.dir={whole / 'ckpt'}")) == 0
    part = tmp_path / "part"
    # Stop at step 30 (mid second epoch: data position matters), then resume to the end.
    assert main(args(cfg_path, data, part, *common, "--train.max_steps=30", f"--checkpoint.dir={part / 'ckpt'}")) == 0
    assert main(args(cfg_path, data, part, *common, "--checkpoint.resume=true", f"--checkpoint.dir={part / 'ckpt'}")) == 0
    a, b = _final_weights(whole / "ckpt"), _final_weights(part / "ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    loss_whole = {r["step"]: r["loss"] for r in records(whole / "logs", "train")}
    loss_part = {r["step"]: r["loss"] for r in records(part / "logs", "train")}
    assert sorted(loss_part) == list(range(1, 49))
    assert loss_part == pytest.approx(loss_whole, rel=1e-6)
    auc_whole, auc_part = records(whole / "logs", "eval")[-1]["auc"], records(part / "logs", "eval")[-1]["auc"]
    assert auc_part == auc_whole


def _own(rank):
    return {"shards": [{"table": "t", "rows": (rank * 5, rank * 5 + 5), "cols": (0, 4), "weight": torch.ones(5, 4) * rank,
                        "state": {}}], "rng": None}


def test_disk_full_during_save_is_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, {"x": torch.ones(3)}, [_own(0), _own(1)])
    real_write = ckpt.atomic_write

    def disk_full_on_second_rank_file(path, data):
        if path.name == "rank_1.pt":
            path.write_bytes(data[:100])  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", disk_full_on_second_rank_file)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint file .*rank_1.pt: ENOSPC") as e:
        ckpt.save_checkpoint(tmp_path, 20, {"x": torch.zeros(3)}, [_own(0), _own(1)])
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_10"]
    assert torch.equal(ckpt.load_latest(tmp_path)["x"], torch.ones(3))


def test_each_rank_file_is_read_only_when_its_rows_are_wanted(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, {"x": 1}, [_own(0), _own(1), _own(2)])
    opened = ckpt.open_latest(tmp_path)
    read = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: read.append(Path(path).name) or real_load(path, **kw))
    pieces = opened.pieces([("t", (6, 9), (0, 4))])  # rows 6-8: rank 1's piece only
    assert read == ["rank_1.pt"] and [p["rows"] for p in pieces] == [(5, 10)]
    assert torch.equal(pieces[0]["weight"], torch.ones(5, 4))


def test_keeps_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, [_own(0)], keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert ckpt.load_latest(tmp_path)["step"] == 4
    assert ckpt.load_latest(tmp_path / "empty") is None


@pytest.mark.parametrize("extra", [["--schema.dense=[]"], ["--model.interaction=dcn", "--tables.dims=[8, 4, 6, 8]"]],
                         ids=["zero-dense", "dcn-mixed-dims"])
def test_model_variants_train(small_data, tmp_path, capsys, extra):
    cfg_path, data = small_data
    assert main(args(cfg_path, data, tmp_path, *extra)) == 0
    auc = records(tmp_path / "logs", "eval")[-1]["auc"]
    assert 0.55 < auc < 1.0


def test_errors_are_one_clear_line(small_data, tmp_path):
    cfg_path, data = small_data
    r = run_cli("-m", "distrec.train", "--config", str(cfg_path), f"--data.path={tmp_path / 'none'}")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"distrec.train: error: {tmp_path / 'none' / 'manifest.json'}: no manifest; "
                                "make the data with `distrec data synth` or `distrec data preprocess` first")
    r = run_cli("-m", "distrec.train", "--config", str(cfg_path), f"--data.path={data}",
                "--tables.cardinalities=[50, 200, 7, 10]")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "table c4 has 10 rows but the data" in r.stderr and "has ids up to 299" in r.stderr
    r = run_cli("-m", "distrec.train", "--config", str(cfg_path), f"--data.path={data}", "--schema.dense=[\"zz\"]")
    assert r.returncode == 2 and "schema.dense names columns the data does not have: zz" in r.stderr


def test_batch_norm_with_a_one_row_last_batch_is_refused_before_training(small_data, tmp_path, capsys):
    """6000 rows in batches of 5999 leave a last batch of one row, which batch norm cannot train on:
    one line naming the option and the ways out, before step 1; drop_last makes the same run train."""
    cfg_path, data = small_data
    assert main(args(cfg_path, data, tmp_path, "--model.norm=batch", "--train.global_batch_size=5999")) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"distrec.train: error: {cfg_path}: model.norm = 'batch' needs 2 rows per rank in "
                                "every batch, and the last batch of 1 rows gives a rank 1: set data.drop_last = "
                                "true or change train.global_batch_size"]
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()
    assert main(args(cfg_path, data, tmp_path / "b", "--model.norm=batch", "--train.global_batch_size=5999",
                     "--data.drop_last=true")) == 0
