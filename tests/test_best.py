"""Early stopping, the best checkpoint kept apart from the rolling `keep`, the final evaluation of the
best model, the test split, and `distrec eval` in one process reproducing the trainer's evaluation."""
import json
import shutil

import pytest
import torch

from distrec.cli import main as cli_main
from distrec.config import ConfigError, load_config
from distrec.data.manifest import read_manifest, write_manifest
from distrec.train import main
from distrec.trainer import checkpoint as ckpt
from distrec.trainer.best import Tracker


def records(log_dir, kind):
    return [r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def stops_after(metric, values, patience):
    """The 1-based evaluation at which the rule stops, or None."""
    t = Tracker(metric)
    for i, v in enumerate(values, 1):
        t.update(i * 10, v)
        if t.since >= patience:
            return i, t.best_step
    return None


def test_stopping_rule_on_scripted_metric_sequences():
    assert stops_after("auc", [0.70, 0.72, 0.71, 0.715, 0.73], 2) == (4, 20)
    assert stops_after("auc", [0.70, 0.72, 0.71, 0.73, 0.72, 0.74], 2) is None  # each dip recovers in time
    assert stops_after("auc", [0.70, 0.72, 0.72], 1) == (3, 20)  # equal is not an improvement
    assert stops_after("logloss", [0.50, 0.45, 0.46, 0.44, 0.47, 0.48], 2) == (6, 40)  # lower is better
    assert stops_after("logloss", [0.50, 0.45, 0.46, 0.44, 0.47, 0.48], 3) is None
    assert stops_after("auc", [float("nan"), 0.6, 0.59], 1) == (3, 20)  # NaN (one class only) never stays best


def test_early_stop_config_inline_table_dotted_override_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nearly_stop = {metric = "logloss", patience = 2}\n[eval]\nevery_steps = 5\n'
                    '[checkpoint]\ndir = "x"\n')
    cfg = load_config(str(toml), ["--train.early_stop.patience=3"])
    assert (cfg.train.early_stop.metric, cfg.train.early_stop.patience) == ("logloss", 3)
    assert load_config(None).train.early_stop.metric == "" and load_config(None).checkpoint.keep_best == ""
    with pytest.raises(ConfigError, match=r"unknown key 'train.early_stop.patiense' \(did you mean 'train.early_stop.patience'"):
        load_config(str(toml), ["--train.early_stop.patiense=3"])
    with pytest.raises(ConfigError, match=r"train.early_stop.metric = 'acc' is not one of"):
        load_config(str(toml), ["--train.early_stop.metric=acc"])
    with pytest.raises(ConfigError, match=r"needs .* eval.every_steps >= 1"):
        load_config(str(toml), ["--eval.every_steps=0"])
    with pytest.raises(ConfigError, match=r"keep the best model in checkpoint.dir, which is not set"):
        load_config(None, ["--checkpoint.keep_best=auc"])
    with pytest.raises(ConfigError, match=r"one best model, one metric"):
        load_config(str(toml), ["--checkpoint.keep_best=auc"])


def _own():
    return {"shards": [{"table": "t", "rows": (0, 5), "cols": (0, 4), "weight": torch.ones(5, 4), "state": {}}]}


def test_rolling_keep_never_removes_the_best(tmp_path):
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1}, [_own()], keep=1)
    ckpt.write_best(tmp_path, 1, "auc", 0.9, keep=1)
    for step in (2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, [_own()], keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_1", "step_4"]
    ckpt.write_best(tmp_path, 4, "auc", 0.95, keep=1)  # a new best: the old one may go now
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_4"]
    assert ckpt.read_best(tmp_path)["step"] == 4


@pytest.fixture(scope="module")
def with_test_split(small_data, tmp_path_factory):
    """The small data with a "test" split (the valid files: its metrics must equal the final evaluation's)."""
    cfg_path, data = small_data
    copy = tmp_path_factory.mktemp("test_split") / "data"
    shutil.copytree(data, copy)
    manifest = read_manifest(copy)
    manifest["splits"]["test"] = manifest["splits"]["valid"]
    manifest.pop("format_version")
    write_manifest(copy, manifest)
    return cfg_path, copy


# A high learning rate over 4 epochs overfits the small data: validation AUC peaks and falls.
OVERFIT = ["--train.epochs=4", "--eval.every_steps=5", "--train.log_every_steps=100", "--optimizer.dense_lr=0.05",
           "--optimizer.sparse_lr=0.5", "--checkpoint.keep=1"]


def test_early_stop_keeps_the_best_and_evaluates_it_at_the_end(with_test_split, tmp_path, capsys):
    cfg_path, data = with_test_split
    d = tmp_path / "ckpt"
    assert main(["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={tmp_path / 'logs'}",
                 f"--checkpoint.dir={d}", *OVERFIT, '--train.early_stop={metric = "auc", patience = 2}',
                 "--data.test_split=test"]) == 0
    out = capsys.readouterr().out
    evals = records(tmp_path / "logs", "eval")
    expected = stops_after("auc", [e["auc"] for e in evals], 2)
    assert expected is not None, [e["auc"] for e in evals]  # the run did overfit
    stop_step, best_step = evals[expected[0] - 1]["step"], expected[1] // 10 * 5
    assert evals[-1]["step"] == stop_step < 96  # stopped there: no evaluation after it
    assert records(tmp_path / "logs", "train")[-1]["step"] == stop_step
    [stop] = records(tmp_path / "logs", "early_stop")
    assert (stop["step"], stop["best_step"]) == (stop_step, best_step)
    assert f"early stop at step {stop_step}: auc has not improved for 2 evaluations" in out
    # keep = 1, yet the best (an earlier step) is on disk and verifies; best.json names it
    assert [p.name for p in ckpt.list_checkpoints(d)] == [f"step_{best_step}", f"step_{stop_step}"]
    assert ckpt.read_best(d)["step"] == best_step
    ckpt.verify(d / f"step_{best_step}")
    # the final evaluation reloads the best step's weights: the metrics logged at that step, exactly
    logged = next(e for e in evals if e["step"] == best_step)
    [final] = records(tmp_path / "logs", "final")
    assert (final["step"], final["auc"], final["logloss"], final["rows"]) == \
        (best_step, logged["auc"], logged["logloss"], logged["rows"])
    assert out.strip().splitlines()[-1].startswith(f"final (best, step {best_step} of {stop_step}): "
                                                   f"auc {logged['auc']:.4f}")
    [test] = records(tmp_path / "logs", "test")  # the test split is the valid files: the same numbers
    assert (test["model"], test["step"], test["auc"], test["logloss"]) == \
        ("best", best_step, logged["auc"], logged["logloss"])
    assert test["click_rate"] > 0 and test["calibration"] == test["mean_prediction"] / test["click_rate"]
    assert f"test (best, step {best_step}): auc {logged['auc']:.4f}" in out

    # `distrec eval` of the best step, in one process, from the checkpoint's own config: the same numbers
    assert cli_main(["eval", "--checkpoint", str(d), "--step", str(best_step), "--split", "test",
                     f"--logging.dir={tmp_path / 'e'}"]) == 0
    [rec] = records(tmp_path / "e", "eval")
    assert (rec["step"], rec["auc"], rec["logloss"], rec["rows"]) == \
        (best_step, logged["auc"], logged["logloss"], logged["rows"])
    assert "calibration" in capsys.readouterr().out


def test_keep_best_without_early_stop_and_the_last_model_otherwise(with_test_split, tmp_path, capsys):
    cfg_path, data = with_test_split
    base = ["--config", str(cfg_path), f"--data.path={data}", *OVERFIT, "--train.epochs=2"]
    assert main([*base, f"--logging.dir={tmp_path / 'a'}", f"--checkpoint.dir={tmp_path / 'ca'}",
                 "--checkpoint.keep_best=logloss"]) == 0
    evals = records(tmp_path / "a", "eval")
    best = min(evals, key=lambda e: e["logloss"])
    assert evals[-1]["step"] == 48 and ckpt.read_best(tmp_path / "ca")["step"] == best["step"]
    [final] = records(tmp_path / "a", "final")
    assert (final["step"], final["logloss"], final["auc"]) == (best["step"], best["logloss"], best["auc"])
    # off (the default): the last model, as before; the test split sees the last model
    assert main([*base, f"--logging.dir={tmp_path / 'b'}", "--data.test_split=test"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: step 48 | auc")
    assert records(tmp_path / "b", "final") == []
    [test] = records(tmp_path / "b", "test")
    last = records(tmp_path / "b", "eval")[-1]
    assert (test["model"], test["step"], test["auc"], test["logloss"]) == ("last", 48, last["auc"], last["logloss"])


def test_early_stop_resumed_mid_patience_stops_where_an_uninterrupted_run_does(small_data, tmp_path):
    """Evaluations every 3 steps, patience 2 on logloss, learning rates high enough that logloss does
    not fall every time: a run stopped (by max_steps) between the evaluations of one patience count and
    resumed keeps the best so far and the count, so it stops at the same step, best at the same step."""
    cfg_path, data = small_data

    def run(root, *more):
        return main(["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={root / 'logs'}",
                     f"--checkpoint.dir={root / 'ckpt'}", "--eval.every_steps=3", "--train.epochs=3",
                     "--train.early_stop.metric=logloss", "--train.early_stop.patience=2",
                     "--optimizer.dense_lr=0.2", "--optimizer.sparse_lr=0.5", *more])

    assert run(tmp_path / "whole") == 0
    (stop,) = records(tmp_path / "whole" / "logs", "early_stop")
    evals = [r["step"] for r in records(tmp_path / "whole" / "logs", "eval")]
    missed = evals.index(stop["step"]) - 1  # the evaluation that began the last count without improvement
    assert stop["step"] - stop["best_step"] == 2 * 3 and stop["step"] < 72, stop  # stopped early, by patience
    cut = evals[missed]  # stop there: the resumed run must still know one evaluation did not improve
    assert run(tmp_path / "split", f"--train.max_steps={cut}") == 0
    assert run(tmp_path / "split", "--checkpoint.resume=true") == 0
    (again,) = records(tmp_path / "split" / "logs", "early_stop")
    assert (again["step"], again["best_step"], again["best"]) == (stop["step"], stop["best_step"], stop["best"])
