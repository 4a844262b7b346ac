"""Horovod as the engine (the SOK + Horovod arrangement): hvd.DistributedOptimizer for the dense part,
hvd.alltoall for the embedding exchanges. Same trajectory as the torchrun / DDP path. `make test`
installs Horovod first (launch/install_horovod.sh)."""
import json
import sys
from pathlib import Path

import pytest

from distrec.config import ConfigError
from distrec.trainer.dist import import_horovod
from tests.conftest import run_cli
from tests.tolerance import EPS32

# A mixed plan: every kind of exchange (row-, table-, column-wise, replicas) goes through Horovod.
MIXED = ["--plan.default=row_wise", '--plan.table_wise=["c2"]', '--plan.column_wise=["c1"]', '--plan.data_parallel=["c3"]']
# Horovod and DDP compute the same step in another order: their all-reduces add the 2 ranks' dense
# gradients in other orders and chunkings, the embedding exchanges are the same all-to-alls. As in
# tests/test_distributed.py, a step's loss is a mean over the global batch (n = GLOBAL_BATCH terms) whose
# inputs carry a like error, so the two losses differ by <= 4 * n * EPS32 relative (C = 2 of
# tests/tolerance.py, twice): 1.2e-4. A real fault is far larger: a dense gradient not averaged (or
# summed twice) or a lost update changes the next losses by ~1e-2.
GLOBAL_BATCH = 252
LOSS_RTOL = 4 * GLOBAL_BATCH * EPS32


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def train_args(cfg_path, data, out):
    return ["-m", "distrec.train", "--config", str(cfg_path), f"--data.path={data}", f"--logging.dir={out}",
            f"--train.global_batch_size={GLOBAL_BATCH}", "--train.max_steps=50", "--train.epochs=3",
            "--train.log_every_steps=1", "--eval.batch_size=500", *MIXED]


def test_horovod_engine_follows_the_torchrun_trajectory(small_data, tmp_path):
    cfg_path, data = small_data
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                *train_args(cfg_path, data, tmp_path / "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    # horovod.runner.launch is what the horovodrun script runs
    r = run_cli("-m", "horovod.runner.launch", "-np", "2", "--gloo", sys.executable,
                *train_args(cfg_path, data, tmp_path / "hvd"), "--dense.engine", "horovod")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "backend horovod" in r.stdout
    ref, got = losses(tmp_path / "ddp"), losses(tmp_path / "hvd")
    assert len(ref) == len(got) == 50
    for step, (a, b) in enumerate(zip(got, ref), 1):
        assert abs(a - b) <= LOSS_RTOL * abs(b), f"step {step}: horovod {a} vs ddp {b}"


def test_without_horovod_the_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # makes `import horovod.torch` fail
    with pytest.raises(ConfigError, match=r"launch/install_horovod.sh"):
        import_horovod()
