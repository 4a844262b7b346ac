"""Real ranks on gloo: N ranks with the same global batch and seed follow the 1-rank trajectory."""
import json

import pytest

from tests.conftest import run_cli


def trajectory(cfg_path, data, out, world):
    r = run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "distrec.train",
                "--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={out}",
                # 6000 rows / 252 = 23 full batches + one of 204 rows: the partial batch is in the trajectory
                "--train.global_batch_size=252", "--train.max_steps=50", "--train.epochs=3",
                "--train.log_every_steps=1", "--eval.every_steps=25", "--eval.batch_size=500")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([x["loss"] for x in recs if x["kind"] == "train"],
            [(x["step"], x["auc"], x["rows"]) for x in recs if x["kind"] == "eval"], r.stdout)


@pytest.fixture(scope="module")
def one_rank(small_data, tmp_path_factory):
    cfg_path, data = small_data
    return trajectory(cfg_path, data, tmp_path_factory.mktemp("w1"), 1)


@pytest.mark.parametrize("world", [2, 3])
def test_same_loss_trajectory_and_eval_as_one_rank(small_data, one_rank, tmp_path, world):
    cfg_path, data = small_data
    losses, evals, stdout = trajectory(cfg_path, data, tmp_path, world)
    ref_losses, ref_evals, _ = one_rank
    assert len(losses) == len(ref_losses) == 50
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"
    assert [e[0] for e in evals] == [25, 50] and all(e[2] == 2000 for e in evals)
    for (_, auc, _), (_, ref_auc, _) in zip(evals, ref_evals):
        assert auc == pytest.approx(ref_auc, abs=1e-4)  # gathered over all ranks, not averaged per rank
    assert f"on {world} rank(s)" in stdout and "backend gloo" in stdout
    assert stdout.strip().splitlines()[-1].startswith("final: step 50 | auc")
