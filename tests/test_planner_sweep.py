"""benchmarks/planner_sweep.py in small form: its tables fit the job they are planned for, and a cell run
in its own process reports the planner's plan (the same as planning the tables here)."""
import json
import sys

from sharding.planner import GB, Workload, plan_tables
from sharding.planner.estimate import state_bytes_per_row
from tests.conftest import REPO, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
import planner_sweep as sweep  # noqa: E402  (a script, not a package)


def test_tables_are_scaled_down_to_fill_half_of_the_ranks_and_never_up():
    for n, ranks in [(2000, 8), (100, 256)]:
        tables, raw = sweep.fitted_tables(n, ranks, 0), sweep.random_tables(n, 0)
        total = sum(t.num_rows * (t.dim * 4 + state_bytes_per_row(sweep.OPTIMIZER, t.dim)) for t in tables)
        assert total <= sweep.FILL * ranks * sweep.topology(ranks).hbm_bytes
        assert all(t.num_rows <= max(r.num_rows, 2) and t.dim == r.dim for t, r in zip(tables, raw))
    few = sweep.random_tables(100, 0)  # 100 tables fill less than half of 256 ranks: kept as drawn
    assert [t.num_rows for t in sweep.fitted_tables(100, 256, 0)] == [max(t.num_rows, 2) for t in few]
    many = sweep.random_tables(2000, 0)  # 2,000 tables on 8 ranks would not fit: every large one shrinks
    assert all(t.num_rows < r.num_rows for t, r in zip(sweep.fitted_tables(2000, 8, 0), many) if r.num_rows > 1000)
    assert [sweep.batch_per_rank(n) for n in (100, 2000, 3000, 10000)] == [8192, 8192, 5376, 1536]


def test_one_cell_against_this_tree_reports_the_plan(tmp_path):
    r = run_cli("benchmarks/planner_sweep.py", "--tables", "60", "--ranks", "8", "--against", str(REPO),
                "--json", str(tmp_path / "cells.json"), "--plot", str(tmp_path / "plot.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    (cell,) = json.loads((tmp_path / "cells.json").read_text())
    result = plan_tables(sweep.fitted_tables(60, 8, 0), sweep.topology(8), Workload(8192, sweep.OPTIMIZER))
    for got in (cell, cell["against"]):
        assert got["step_ms"] == result.step_s * 1e3
        assert got["max_memory_gb"] == max(x.memory.total for x in result.ranks) / GB
        assert got["time_vs_mean"] >= 1 and got["memory_vs_mean"] >= 1
    assert (tmp_path / "plot.png").stat().st_size > 0 and "| 60 | 8 | 8,192 |" in r.stdout
