"""``distrec plan`` end to end: the printed plan, the one-line error when nothing fits, --what-if, and a
planned JSON that the trainer runs on 2 gloo ranks (with its measured-vs-estimated log). The command
runs in-process (``distrec.cli.main``, the same parser and error handling as the console script)
except for training, which needs torchrun."""
from __future__ import annotations

import re

import pytest

from distrec.cli import main
from distrec.config import load_config, table_specs
from distrec.trainer.precision import BF16_FLAGS, cpu_flags
from sharding.plan import load_plan
from sharding.planner.calibration import load_calibration
from sharding.types import ShardingType, TableConfig
from tests.conftest import REPO, run_cli

TERABYTE = ["plan", "--config", str(REPO / "configs/criteo_terabyte.toml"), "--calibration", "none"]


class Result:
    def __init__(self, returncode: int, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


def plan_cli(capsys, *args: str) -> Result:
    code = main(list(args))
    return Result(code, capsys.readouterr())


def test_prints_a_row_per_table_and_rank_and_writes_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    r = plan_cli(capsys, *TERABYTE, "--gpus", "8", "--hbm-gb", "16", "--json", str(out))  # the config's own optimizer
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    specs = table_specs(load_config(str(REPO / "configs/criteo_terabyte.toml")))
    for s in specs:
        row = next(line for line in lines if line.startswith(f"{s.name} "))
        assert f"{s.num_rows:,}" in row and ("cost:" in row or "memory:" in row or "balance:" in row)
    assert [line.split()[0] for line in lines if re.match(r"^\d+\s+\d+\.\d+ / 16\.00 GB", line)] == \
        [str(r) for r in range(8)]
    assert re.search(r"imbalance: slowest rank \d is \d+\.\d % above the mean", r.stdout)
    assert re.search(r"estimated step time: [\d.]+ ms -> [\d,]+ samples/s", r.stdout)
    tables = [TableConfig(s.name, s.num_rows, s.dim, s.pooling) for s in specs]
    plan = load_plan(out, tables, world_size=8)
    assert plan.tables["C20"].sharding_type in (ShardingType.ROW_WISE, ShardingType.COLUMN_WISE)


def test_a_plan_that_does_not_fit_is_one_error_line(capsys):
    # full Adagrad: 182 GB of tables and state
    r = plan_cli(capsys, *TERABYTE, "--gpus", "8", "--hbm-gb", "16", "--optimizer.sparse=adagrad")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.startswith("distrec: error: no plan fits 8 ranks with 16.0 GB each: tables C1 (45,833,188 rows")
    assert "C20" in line and re.search(r"\d+\.\d\d GB more than each rank has", line)
    assert re.search(r"smallest change that fits: \d+ ranks \(--gpus \d+\) or \d+ GB per rank \(--hbm-gb \d+\)", line)


def test_json_into_a_missing_folder_fails_before_planning(tmp_path, capsys):
    target = tmp_path / "missing" / "plan.json"
    assert main(["plan", "--gpus", "2", "--config", str(REPO / "configs/demo.toml"), "--json", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"distrec: error: --json {target}: the folder {target.parent} "
                                         "does not exist")


def test_what_if_side_by_side(capsys):
    r = plan_cli(capsys, *TERABYTE, "--gpus", "8", "--optimizer.sparse=rowwise_adagrad", "--what-if", "gpus=4,8,16")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["gpus=4", "gpus=8", "gpus=16"]
    batch = next(row for row in rows if row.startswith("batch per rank"))
    assert batch.split()[-3:] == ["16,384", "8,192", "4,096"]  # the global batch of 65,536 split
    assert next(row for row in rows if row.startswith("fits")).split()[1:] == ["yes"] * 3


def test_planned_json_trains_on_two_ranks(small_data, tmp_path, capsys):
    cfg_path, data = small_data
    plan = tmp_path / "plan.json"
    r = plan_cli(capsys, "plan", "--config", str(cfg_path), "--gpus", "2", "--preset", "cpu",
                "--calibration", "none", "--measure-pooling", f"--data.path={data}", "--json", str(plan))
    assert r.returncode == 0, r.stderr
    c2 = next(line for line in r.stdout.splitlines() if line.startswith("c2 "))
    assert float(c2.split()[3]) == pytest.approx(2.0, abs=0.05)  # measured: 1..3 ids per sample, mean 2
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "distrec.train",
                "--config", str(cfg_path), f"--data.path={data}", "--plan", str(plan), "--train.max_steps=3",
                "--eval.max_rows=500", "--planner.calibration=none")
    assert r.returncode == 0, r.stderr[-3000:]
    checks = re.findall(r"plan check rank (\d): shards \+ optimizer state estimated ([\d.]+) MB, measured ([\d.]+) MB",
                        r.stdout)
    assert [c[0] for c in checks] == ["0", "1"]
    for _, estimated, measured in checks:
        assert float(estimated) == pytest.approx(float(measured), rel=0.10)
    assert re.search(r"plan check: step time estimated [\d.]+ ms \(cpu, uncalibrated", r.stdout)
    assert r.stdout.strip().splitlines()[-1].startswith("final: step 3 | auc")


@pytest.mark.parametrize("with_data", [True, False], ids=["training-data", "synthetic"])
def test_calibrate_measures_on_two_ranks_and_later_estimates_use_it(small_data, tmp_path, capfd, with_data):
    """The whole step reads the config's training data through the trainer's loader when it is there."""
    cfg_path, data = small_data
    rates = tmp_path / "calibration.json"
    r = plan_cli(capfd, "plan", "--calibrate", "--gpus", "2", "--preset", "cpu", "--config", str(cfg_path),
                 "--calibration", str(rates), f"--data.path={data if with_data else tmp_path / 'none'}")
    assert r.returncode == 0, r.stderr
    assert (f"whole training step on {data} through the trainer's loader" in r.stdout) == with_data
    assert re.search(r"whole training step [\d.]+ ms, [-+][\d.]+ ms beyond its parts", r.stdout)
    measured = load_calibration(rates, "cpu")
    assert measured["lookup_bytes_per_s"] > 0 and measured["alltoall_bytes_per_s"] > 0
    bf16 = bool(set(BF16_FLAGS) & cpu_flags())  # the dense step is timed under bf16 too where the CPU has bf16
    assert set(measured["raw_seconds"]) == {"alltoall", "dense", "runtime", "replicated", "full"} | \
        ({"dense_bf16"} if bf16 else set())
    assert ("dense_bf16_flops_per_s" in measured) == bf16 == ("dense under bf16 autocast" in r.stdout)
    r = plan_cli(capfd, "plan", "--gpus", "2", "--preset", "cpu", "--config", str(cfg_path),
                 "--calibration", str(rates))
    assert r.returncode == 0, r.stderr
    assert f"calibrated from {rates}" in r.stdout
