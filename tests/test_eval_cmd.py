"""`distrec eval` on real ranks: a checkpoint saved on 2 ranks, evaluated on 2 (the same rows, order and
arithmetic as the trainer: equal to the last bit), on 1 and on 3 (resharded on load)."""
import json

import pytest

from tests.conftest import run_cli
from tests.test_distributed import AUC_ATOL
from tests.tolerance import sum_tol

# Another world size cuts the pooled sums and the batches otherwise, so a logit comes out of float32 sums in
# another order. A logloss term moves by at most |d logit| (its derivative in the logit is p - y, within
# [-1, 1]), so the mean does too. A logit here is a sum of <= 64 terms (the widest layer input: 4 pooled
# embeddings of 8 plus the interactions, or the 16-wide hidden layers) whose magnitudes add up to < 10.
LOGLOSS_ATOL = sum_tol(10.0, 64)  # 1.5e-4; a missing or misplaced shard moves the logloss by > 1e-2


def torchrun(world, *args):
    r = run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *args)
    return r


def metrics(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    cfg_path, data = small_data
    out = tmp_path_factory.mktemp("eval2")
    r = torchrun(2, "-m", "distrec.train", "--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={out}",
                 f"--checkpoint.dir={out / 'ckpt'}", "--train.max_steps=20", "--eval.every_steps=10",
                 "--eval.batch_size=500", "--checkpoint.keep_best=auc", "--checkpoint.keep=1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, {x["step"]: x for x in metrics(out) if x["kind"] == "eval"}


@pytest.mark.parametrize("world", [2, 1, 3])
def test_eval_reproduces_the_logged_evaluation(trained, tmp_path, world):
    out, logged = trained
    step = 10 if 10 in logged and (out / "ckpt" / "step_10").is_dir() else 20  # the best step and the last stay
    args = ["eval", "--checkpoint", str(out / "ckpt"), "--step", str(step), f"--logging.dir={tmp_path}"]
    r = torchrun(world, "-m", "distrec.cli", *args) if world > 1 else run_cli("-m", "distrec", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    [rec] = metrics(tmp_path)
    want = logged[step]
    assert (rec["kind"], rec["step"], rec["rows"], rec["world_size"], rec["split"]) == ("eval", step, 2000, world, "valid")
    if world == 2:  # as saved: the same plan, batches and sums
        assert (rec["auc"], rec["logloss"]) == (want["auc"], want["logloss"])
    else:
        assert abs(rec["auc"] - want["auc"]) <= AUC_ATOL
        assert abs(rec["logloss"] - want["logloss"]) <= LOGLOSS_ATOL
    assert rec["calibration"] == pytest.approx(rec["mean_prediction"] / rec["click_rate"], rel=1e-12)
    assert f"auc {rec['auc']:.6f} | logloss {rec['logloss']:.6f} | calibration" in r.stdout


def test_eval_errors_are_one_line_on_every_rank(trained):
    out, _ = trained
    r = torchrun(2, "-m", "distrec.cli", "eval", "--checkpoint", str(out / "ckpt"), "--step", "7")
    # torchrun's agent reports the failed children with its own traceback; the ranks' own is one line each
    assert r.returncode != 0 and "distrec/tools" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("distrec: error:")]
    assert sorted(lines) == [f"distrec: error: [rank {k}] {out / 'ckpt'}: no step_7" for k in (0, 1)]
