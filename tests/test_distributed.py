"""Real ranks on gloo: N ranks with the same global batch and seed follow the 1-rank trajectory, with the
plain-PyTorch lookup kernel as the 1-rank reference and either kernel (torch, fbgemm) on N ranks."""
import json

import pytest
import torch

from distrec.trainer.checkpoint import load_latest
from sharding.checkpoint import whole_tables

from tests.conftest import run_cli


MIXED = ['--plan.table_wise=["c2"]', '--plan.column_wise=["c1"]', '--plan.data_parallel=["c3"]']


def trajectory(cfg_path, data, out, world, *extra, steps=50):
    r = run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "distrec.train",
                "--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={out}",
                # 6000 rows / 252 = 23 full batches + one of 204 rows: the partial batch is in the trajectory
                "--train.global_batch_size=252", f"--train.max_steps={steps}", "--train.epochs=3",
                "--train.log_every_steps=1", "--eval.every_steps=25", "--eval.batch_size=500", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([x["loss"] for x in recs if x["kind"] == "train"],
            [(x["step"], x["auc"], x["rows"]) for x in recs if x["kind"] == "eval"], r.stdout)


def final_tables(ckpt_dir):
    """Every table whole, with its Adagrad state, from a checkpoint's shards (any plan)."""
    whole = whole_tables(load_latest(ckpt_dir)["shards"], "adagrad")
    return {p["table"]: (p["weight"], p["state"]["sum"]) for p in whole}


@pytest.fixture(scope="module")
def one_rank(small_data, tmp_path_factory):
    cfg_path, data = small_data
    out = tmp_path_factory.mktemp("w1")
    return (*trajectory(cfg_path, data, out, 1, f"--checkpoint.dir={out / 'ckpt'}", "--plan.kernel=torch"),
            final_tables(out / "ckpt"))


def assert_same_losses(losses, ref_losses):
    assert len(losses) == len(ref_losses) == 50
    for step, (a, b) in enumerate(zip(losses, ref_losses), 1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b}"


PIPELINED = [*MIXED, "--train.pipeline=true"]


# Column shards of the 8-wide c1 are 4 wide on 2 ranks (fbgemm can take them), 3/3/2 on 3 ranks (torch only).
@pytest.mark.parametrize("world,plan,kernel", [(2, [], "fbgemm"), (3, [], "torch"), (2, MIXED, "fbgemm"),
                                               (3, PIPELINED, "torch"), (2, PIPELINED, "fbgemm")],
                         ids=["2-row_wise-fbgemm", "3-row_wise-torch", "2-mixed-fbgemm", "3-mixed-pipelined-torch",
                              "2-mixed-pipelined-fbgemm"])
def test_same_loss_trajectory_and_eval_as_one_rank(small_data, one_rank, tmp_path, world, plan, kernel):
    cfg_path, data = small_data
    losses, evals, stdout = trajectory(cfg_path, data, tmp_path, world, *plan, f"--plan.kernel={kernel}",
                                       f"--checkpoint.dir={tmp_path / 'ckpt'}")
    ref_losses, ref_evals, _, ref_tables = one_rank
    assert_same_losses(losses, ref_losses)
    for name, (weight, state) in final_tables(tmp_path / "ckpt").items():  # after 50 steps
        torch.testing.assert_close(weight, ref_tables[name][0], rtol=1e-4, atol=1e-6, msg=f"table {name}")
        torch.testing.assert_close(state, ref_tables[name][1], rtol=1e-4, atol=1e-6, msg=f"table {name} state")
    assert [e[0] for e in evals] == [25, 50] and all(e[2] == 2000 for e in evals)
    for (_, auc, _), (_, ref_auc, _) in zip(evals, ref_evals):
        assert auc == pytest.approx(ref_auc, abs=1e-4)  # gathered over all ranks, not averaged per rank
    assert f"plan on {world} rank(s), backend gloo" in stdout
    assert f"embedding kernel: {kernel} (" in stdout
    assert ("pipeline: on" in stdout) == ("--train.pipeline=true" in plan)
    assert stdout.strip().splitlines()[-1].startswith("final: step 50 | auc")


def test_resharding_2_to_3_ranks_continues_the_same_trajectory(small_data, one_rank, tmp_path):
    """Checkpoint at 2 ranks row-wise, resume at 3 ranks with a mixed plan: same losses as 1 rank."""
    cfg_path, data = small_data
    ckpt = f"--checkpoint.dir={tmp_path / 'ckpt'}"
    first, _, _ = trajectory(cfg_path, data, tmp_path / "a", 2, ckpt, steps=20)
    rest, _, stdout = trajectory(cfg_path, data, tmp_path / "b", 3, ckpt, "--checkpoint.resume=true", *MIXED)
    assert "resumed from" in stdout and "at step 20" in stdout
    assert_same_losses(first + rest, one_rank[0])
