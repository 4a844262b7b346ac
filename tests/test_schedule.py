"""Learning-rate schedules, dense weight decay, and learning rates at resume (distrec.trainer.schedule)."""
import json
import math

import pytest
import torch

from distrec.config import ConfigError, OptimizerConfig, load_config
from distrec.train import main
from distrec.trainer import checkpoint as ckpt
from distrec.trainer.optim import dense_optimizer
from distrec.trainer.schedule import Plateau, Schedule, lr_factor


def cfg(**kw) -> OptimizerConfig:
    return OptimizerConfig(**kw)


# Each schedule's factor at every step, written out from its definition (README "Schedules").
def test_warmup_rises_linearly_then_stays():
    c = cfg(schedule="warmup", warmup_steps=4)
    assert [lr_factor(s, c) for s in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_step_multiplies_every_decay_steps():
    c = cfg(schedule="step", decay_steps=3, decay_rate=0.5)
    assert [lr_factor(s, c) for s in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_exponential_is_rate_to_the_fraction_of_decay_steps():
    c = cfg(schedule="exponential", decay_steps=4, decay_rate=0.1)
    for s in range(10):
        assert lr_factor(s, c) == 0.1 ** (s / 4)
    assert lr_factor(4, c) == pytest.approx(0.1, rel=1e-15) and lr_factor(2, c) == pytest.approx(math.sqrt(0.1))


def test_mlperf_warms_up_holds_then_decays_quadratically_to_zero():
    c = cfg(schedule="mlperf", warmup_steps=2, decay_start_step=4, decay_steps=4)
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, (3 / 4) ** 2, (2 / 4) ** 2, (1 / 4) ** 2, 0.0, 0.0]
    assert [lr_factor(s, c) for s in range(10)] == expected


def test_constant_is_one():
    assert {lr_factor(s, cfg()) for s in range(100)} == {1.0}


def test_plateau_reduces_at_the_patience_th_evaluation_without_improvement():
    p = Plateau("auc", patience=2)
    # best 0.70, 0.72; 0.71 and 0.72 (not strictly better) -> reduce; 0.73 better; 0.60, 0.60 -> reduce
    aucs = [0.70, 0.72, 0.71, 0.72, 0.73, 0.60, 0.60, 0.74]
    assert [p.evaluated(a) for a in aucs] == [False, False, False, True, False, False, True, False]
    assert p.reductions == 2 and p.best == 0.74
    q = Plateau("logloss", patience=1)  # lower is better
    assert [q.evaluated(x) for x in [0.5, 0.4, 0.45, 0.3, 0.3]] == [False, False, True, False, True]


def test_schedule_sets_dense_and_sparse_lr_and_plateau_survives_its_state_dict():
    c = cfg(schedule="plateau", plateau_patience=1, decay_rate=0.5, dense_lr=0.01, sparse_lr=0.2)
    dense = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1.0)

    class Sparse:  # the EmbeddingOptimizer's lr interface; the kernels' set_lr is tested in test_sparse_l2
        lr = None

        def set_lr(self, lr):
            self.lr = lr

    sched, sparse = Schedule(c), Sparse()
    assert sched.apply(0, [dense, sparse]) == (0.01, 0.2) and sched.apply(1, [dense, sparse]) is None
    sched.evaluated({"auc": 0.7, "logloss": 0.5})
    assert sched.evaluated({"auc": 0.6, "logloss": 0.5})
    assert sched.apply(2, [dense, sparse]) == (0.005, 0.1)
    assert dense.param_groups[0]["lr"] == 0.005 and sparse.lr == 0.1
    again = Schedule(c)
    again.load_state_dict(json.loads(json.dumps(sched.state_dict())))  # plain data
    assert again.lrs(2) == (0.005, 0.1)
    assert Schedule(cfg(schedule="step", decay_steps=1, decay_rate=0.5, schedule_sparse=False,
                        dense_lr=1.0, sparse_lr=0.3)).lrs(2) == (0.25, 0.3)


def test_schedule_config_errors_are_one_line():
    for bad, text in [("--optimizer.schedule=cosine", "optimizer.schedule = 'cosine' is not one of"),
                      ("--optimizer.schedule=warmup", "needs optimizer.warmup_steps >= 1"),
                      ("--optimizer.schedule=step", "needs optimizer.decay_steps >= 1"),
                      ("--optimizer.schedule=plateau", "needs optimizer.plateau_patience >= 1 and eval.every_steps"),
                      ("--optimizer.plateau_metric=acc", "optimizer.plateau_metric = 'acc' is not one of"),
                      ("--optimizer.sparse_l2=-1", "optimizer.sparse_l2 must be >= 0")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [bad])
        assert text in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))
    c = load_config(None, ["--optimizer.schedule=mlperf", "--optimizer.warmup_steps=2",
                           "--optimizer.decay_steps=5", "--optimizer.decay_start_step=3"]).optimizer
    assert (c.schedule, c.warmup_steps, c.decay_steps, c.decay_start_step) == ("mlperf", 2, 5, 3)


def test_dense_weight_decay_is_decoupled_for_adam_and_l2_for_sgd():
    torch.manual_seed(0)
    w0, g = torch.randn(5), torch.randn(5)
    lr, wd, eps = 0.1, 0.3, 1e-8

    def one_step(kind, weight_decay):
        p = torch.nn.Parameter(w0.clone())
        opt = dense_optimizer(kind, [p], lr, eps, weight_decay)
        p.grad = g.clone()
        opt.step()
        return opt, p.detach()

    opt, w = one_step("adam", wd)
    assert type(opt) is torch.optim.AdamW
    # AdamW's first step: w * (1 - lr * wd) - lr * m_hat / (sqrt(v_hat) + eps), m_hat = g, v_hat = g^2
    expected = w0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(w, expected, rtol=4 * 1.2e-7, atol=4 * 1.2e-7 * float(w0.abs().max()))
    assert type(one_step("adam", 0.0)[0]) is torch.optim.Adam  # 0: unchanged (plain Adam)
    _, w = one_step("sgd", wd)
    torch.testing.assert_close(w, w0 - lr * (g + wd * w0), rtol=0, atol=2 * 1.2e-7 * float((w0.abs() + g.abs()).max()))


def _args(cfg_path, data, root, *more):
    return ["--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={root / 'logs'}",
            f"--checkpoint.dir={root / 'ckpt'}", *more]


def _lr_records(root):
    lines = map(json.loads, (root / "logs" / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["dense_lr"], r["sparse_lr"]) for r in lines if r["kind"] == "lr"]


def test_a_schedule_continues_across_a_resume(small_data, tmp_path):
    """Exponential decay every step: 12 steps, checkpoint, resume to 20; the lr at each step is its formula."""
    cfg_path, data = small_data
    sched = ["--optimizer.schedule=exponential", "--optimizer.decay_steps=10", "--optimizer.decay_rate=0.5"]
    assert main(_args(cfg_path, data, tmp_path, *sched, "--train.max_steps=12")) == 0
    assert main(_args(cfg_path, data, tmp_path, *sched, "--train.max_steps=20", "--checkpoint.resume=true")) == 0
    got = _lr_records(tmp_path)
    assert [s for s, _, _ in got] == list(range(20))
    for step, dense, sparse in got:  # the config's dense_lr 0.01 and sparse_lr 0.1 (tests/conftest.py)
        assert dense == 0.01 * 0.5 ** (step / 10) and sparse == 0.1 * 0.5 ** (step / 10)


def test_dense_lr_given_at_resume_wins_and_is_said(small_data, tmp_path, capsys):
    cfg_path, data = small_data
    assert main(_args(cfg_path, data, tmp_path, "--train.max_steps=5")) == 0
    capsys.readouterr()
    assert main(_args(cfg_path, data, tmp_path, "--train.max_steps=8", "--checkpoint.resume=true",
                      "--optimizer.dense_lr=0.002")) == 0
    out = capsys.readouterr()
    assert "dense_lr 0.002 from the config replaces 0.01 from the checkpoint" in out.out + out.err
    assert _lr_records(tmp_path)[-1] == (5, 0.002, 0.1)
    saved = ckpt.load_latest(tmp_path / "ckpt")
    assert saved["position"]["step"] == 8
    assert {g["lr"] for g in saved["dense_optimizer"]["param_groups"]} == {0.002}


def _records(root, kind):
    lines = map(json.loads, (root / "logs" / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == kind]


def test_plateau_in_a_real_run_reduces_where_its_rule_says_and_survives_a_resume(small_data, tmp_path):
    """Reduce on a logloss plateau (patience 1, halving) in a 30-step run with an evaluation every 3 steps
    (learning rates high enough that logloss does not fall at every evaluation): the lr changes exactly
    after the evaluations at which the rule, replayed on the logged values, reduces; a run stopped at
    step 15 (its last evaluation there counts as the periodic one) and resumed logs the same evaluations
    and the same lr changes: what plateau had seen came back from the checkpoint."""
    cfg_path, data = small_data
    sched = ["--optimizer.schedule=plateau", "--optimizer.plateau_metric=logloss", "--optimizer.plateau_patience=1",
             "--optimizer.decay_rate=0.5", "--eval.every_steps=3", "--train.epochs=2", "--optimizer.dense_lr=0.2",
             "--optimizer.sparse_lr=0.5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_args(cfg_path, data, whole, *sched, "--train.max_steps=30")) == 0
    assert main(_args(cfg_path, data, split, *sched, "--train.max_steps=15")) == 0
    assert main(_args(cfg_path, data, split, *sched, "--train.max_steps=30", "--checkpoint.resume=true")) == 0
    evals = [(r["step"], r["logloss"]) for r in _records(whole, "eval")]
    assert [s for s, _ in evals] == list(range(3, 31, 3))
    rule, expected = Plateau("logloss", 1), []
    for step, value in evals[:-1]:  # after the last one no step follows
        if rule.evaluated(value):
            expected.append((step, 0.2 * 0.5 ** rule.reductions, 0.5 * 0.5 ** rule.reductions))
    assert expected, f"no plateau in {evals}: the test would show nothing"
    assert _changes(_lr_records(whole)) == expected
    assert [(r["step"], r["logloss"]) for r in _records(split, "eval")] == evals
    assert _changes(_lr_records(split)) == expected  # the resumed process also says its starting lr


def _changes(records):
    """The lr records whose rates differ from the ones before (the first sets them)."""
    return [r for before, r in zip(records, records[1:]) if r[1:] != before[1:]]
