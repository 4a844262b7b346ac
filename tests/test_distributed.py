"""Real ranks on gloo: N ranks with the same global batch and seed follow the 1-rank trajectory, with the
plain-PyTorch lookup kernel as the 1-rank reference and each kernel (torch, fbgemm, cpu) on N ranks."""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from distrec.trainer.checkpoint import load_latest
from sharding.checkpoint import whole_tables

from tests.conftest import REPO, run_cli


ROW_WISE = ["--plan.default=row_wise"]
MIXED = [*ROW_WISE, '--plan.table_wise=["c2"]', '--plan.column_wise=["c1"]', '--plan.data_parallel=["c3"]']

# Tolerances, from the arithmetic rather than from one CPU. The N-rank run computes the same sums as the
# 1-rank run in another order (other ranks, other threads, other SIMD widths: AMD and AVX-512 Intel
# differ), and reordering a float32 sum of n terms changes it by at most n * EPS32 relative to the sum of
# their magnitudes. A row's gradient sums at most one global batch of bags: n = GLOBAL_BATCH.
EPS32 = torch.finfo(torch.float32).eps
GLOBAL_BATCH, STEPS, SPARSE_LR = 252, 50, 0.1  # as trajectory() runs SMALL_TOML
# The loss of a step is a mean over the global batch: 2 * n * EPS32 for its own sum and the logits' inputs.
LOSS_RTOL = 4 * GLOBAL_BATCH * EPS32  # 1.2e-4
# An Adagrad step moves an element by lr * g / sqrt(G) <= lr; a relative error d in g and G moves that by
# <= 2 * d * lr. So after STEPS steps an element differs by at most STEPS * 2 * n * EPS32 * lr = 3.0e-4.
# A real fault is far larger: a missed update moves an element by ~lr / sqrt(touches) ~ 1e-2, and a row
# taken from the wrong place by the initial scale sqrt(1 / rows) >= 0.06.
WEIGHT_ATOL = STEPS * 2 * GLOBAL_BATCH * EPS32 * SPARSE_LR
# G sums <= STEPS squares, each with relative error <= 2 * n * EPS32 (rows never touched are 0 in both).
STATE_RTOL = 2 * GLOBAL_BATCH * EPS32 * STEPS  # 3.0e-3
# AUC over 2,000 rows (~25 % clicks) is a rank statistic: a prediction reordered by rounding swaps one
# near-tie, which moves the AUC by 1 / (positives * negatives) ~ 2.7e-6; 1e-4 allows ~37 such swaps.
AUC_ATOL = 1e-4


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
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: {a} vs {b}"


PIPELINED = [*MIXED, "--train.pipeline=true"]


# Column shards of the 8-wide c1 are 4 wide on 2 ranks (fbgemm can take them), 3/3/2 on 3 ranks (torch and cpu).
@pytest.mark.parametrize("world,plan,kernel", [(2, ROW_WISE, "fbgemm"), (3, ROW_WISE, "torch"), (2, MIXED, "fbgemm"),
                                               (3, PIPELINED, "torch"), (2, PIPELINED, "fbgemm"), (3, MIXED, "cpu")],
                         ids=["2-row_wise-fbgemm", "3-row_wise-torch", "2-mixed-fbgemm", "3-mixed-pipelined-torch",
                              "2-mixed-pipelined-fbgemm", "3-mixed-cpu"])
def test_same_loss_trajectory_and_eval_as_one_rank(small_data, one_rank, tmp_path, world, plan, kernel):
    cfg_path, data = small_data
    losses, evals, stdout = trajectory(cfg_path, data, tmp_path, world, *plan, f"--plan.kernel={kernel}",
                                       f"--checkpoint.dir={tmp_path / 'ckpt'}")
    ref_losses, ref_evals, _, ref_tables = one_rank
    assert_same_losses(losses, ref_losses)
    for name, (weight, state) in final_tables(tmp_path / "ckpt").items():  # after 50 steps
        torch.testing.assert_close(weight, ref_tables[name][0], rtol=0, atol=WEIGHT_ATOL, msg=f"table {name}")
        torch.testing.assert_close(state, ref_tables[name][1], rtol=STATE_RTOL, atol=0, msg=f"table {name} state")
    assert [e[0] for e in evals] == [25, 50] and all(e[2] == 2000 for e in evals)
    for (_, auc, _), (_, ref_auc, _) in zip(evals, ref_evals):
        assert auc == pytest.approx(ref_auc, abs=AUC_ATOL)  # gathered over all ranks, not averaged per rank
    assert f"plan on {world} rank(s), backend gloo" in stdout
    assert f"embedding kernel: {kernel} (" in stdout
    assert ("pipeline: on" in stdout) == ("--train.pipeline=true" in plan)
    assert stdout.strip().splitlines()[-1].startswith("final: step 50 | auc")


def test_resharding_2_to_3_ranks_continues_the_same_trajectory(small_data, one_rank, tmp_path):
    """Checkpoint at 2 ranks row-wise, resume at 3 ranks with a mixed plan: same losses as 1 rank."""
    cfg_path, data = small_data
    ckpt = f"--checkpoint.dir={tmp_path / 'ckpt'}"
    first, _, _ = trajectory(cfg_path, data, tmp_path / "a", 2, ckpt, *ROW_WISE, steps=20)
    rest, _, stdout = trajectory(cfg_path, data, tmp_path / "b", 3, ckpt, "--checkpoint.resume=true", *MIXED)
    assert "resumed from" in stdout and "at step 20" in stdout
    assert_same_losses(first + rest, one_rank[0])


def test_reshard_2_to_3_offline_then_resume_on_3_continues_the_same_trajectory(small_data, one_rank, tmp_path):
    """`distrec reshard --world-size 3` of a 2-rank checkpoint; 3 ranks resume from its output (rank 2
    had no saved random stream) and follow the 1-rank losses."""
    cfg_path, data = small_data
    first, _, _ = trajectory(cfg_path, data, tmp_path / "a", 2, f"--checkpoint.dir={tmp_path / 'c2'}", steps=20)
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(tmp_path / "c2"),
                "--out", str(tmp_path / "c3"), "--world-size", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    rest, _, stdout = trajectory(cfg_path, data, tmp_path / "b", 3, f"--checkpoint.dir={tmp_path / 'c3'}",
                                 "--checkpoint.resume=true")
    assert "resumed from" in stdout and "at step 20" in stdout
    assert_same_losses(first + rest, one_rank[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_table_row_wise_on_two_nodes_keeps_each_table_on_one_node_and_the_trajectory(small_data, one_rank,
                                                                                      tmp_path):
    """Two torchrun agents on this machine as two nodes of 2 ranks (static rendezvous, as two hosts
    would run it): the trainer takes the node size from the launcher, so every table's row shards sit on
    one node's ranks (the tables take the nodes in turn), and the 4 ranks follow the 1-rank losses."""
    cfg_path, data = small_data
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "distrec.train", "--config", str(cfg_path),
         f"--data.path={data}", f"--logging.dir={tmp_path}", "--train.global_batch_size=252", "--train.max_steps=50",
         "--train.epochs=3", "--train.log_every_steps=1", "--eval.every_steps=25", "--eval.batch_size=500",
         "--plan.default=table_row_wise", "--plan.kernel=torch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env) for node in (0, 1)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    plan = {m.group(1): m.group(2) for m in re.finditer(r"^(c\d)\s+\d+\s+\d+\s+table_row_wise\s+(\S+)$",
                                                        outs[0][0], re.M)}
    assert plan == {"c1": "0-1", "c2": "2-3", "c3": "0-1", "c4": "2-3"}
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert_same_losses([x["loss"] for x in recs if x["kind"] == "train"], one_rank[0])
