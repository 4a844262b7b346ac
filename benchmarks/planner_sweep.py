"""Planning time against tables x ranks, and the plan's balance: slowest rank's step time and the
largest rank's memory against the mean rank's.

    .venv/bin/python benchmarks/planner_sweep.py                          # 100 ... 10,000 tables, 8 ... 256 ranks
    .venv/bin/python benchmarks/planner_sweep.py --tables 10000 --ranks 256 --plot docs/planner_time.png

Tables as in ``planner_scale.py`` (rows log-uniform in [1e2, 1e8], dims from {16, ..., 256}, seeded), made
to fit the job they are planned for, as a production model of that size would be: rows scaled down
(never up) so that the tables with their optimizer state fill at most ``FILL`` of the ranks' memory, and
a batch per rank that keeps the pooled rows of all tables (batch x sum of dims) as large as 2,000 tables
at 8,192 per rank. Each cell runs in its own process (``--timeout`` seconds); the time is the planner's
own (``PlanResult.planning_s``), CPU seconds beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from planner_scale import BATCH_PER_RANK, OPTIMIZER, PRESET, random_tables, topology
from sharding.planner import GB, PlannerError, Workload, plan_tables
from sharding.planner.estimate import state_bytes_per_row
from sharding.types import TableConfig

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FILL = 0.5  # tables + optimizer state, as a share of all ranks' memory
POOLED_TABLES_AT_FULL_BATCH = 2000  # tables x batch per rank held at 2,000 x 8,192 (pooled-row buffers)
BATCH_STEP = 256


def fitted_tables(n: int, ranks: int, seed: int) -> list[TableConfig]:
    """``n`` random tables whose rows (and optimizer state) take at most FILL of ``ranks`` ranks."""
    tables = random_tables(n, seed)
    row_bytes = [t.dim * 4 + state_bytes_per_row(OPTIMIZER, t.dim) for t in tables]
    total = sum(t.num_rows * b for t, b in zip(tables, row_bytes))
    scale = min(1.0, FILL * ranks * topology(ranks).hbm_bytes / total)
    return [TableConfig(t.name, max(2, int(t.num_rows * scale)), t.dim) for t in tables]


def batch_per_rank(n: int) -> int:
    fair = BATCH_PER_RANK * POOLED_TABLES_AT_FULL_BATCH // max(n, 1)
    return max(BATCH_STEP, min(BATCH_PER_RANK, fair // BATCH_STEP * BATCH_STEP))


def plan_cell(n: int, ranks: int, seed: int) -> dict:
    tables, work = fitted_tables(n, ranks, seed), Workload(batch_per_rank(n), OPTIMIZER)
    cpu = time.process_time()
    try:
        result = plan_tables(tables, topology(ranks), work)
    except PlannerError as e:
        return {"error": str(e)[:200], "cpu_seconds": time.process_time() - cpu}
    times = [r.time.total for r in result.ranks]
    mems = [r.memory.total for r in result.ranks]
    return {"seconds": result.planning_s, "cpu_seconds": time.process_time() - cpu,
            "step_ms": max(times) * 1e3, "time_vs_mean": max(times) / (sum(times) / len(times)),
            "max_memory_gb": max(mems) / GB, "memory_vs_mean": max(mems) / (sum(mems) / len(mems))}


def run_cell(n: int, ranks: int, seed: int, timeout_s: float, tree: str = REPO) -> dict:
    """One cell in a fresh process whose ``sharding`` is ``tree``'s (this checkout, or --against's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, HERE])}
    cell = {"tables": n, "ranks": ranks, "batch_per_rank": batch_per_rank(n)}
    try:
        done = subprocess.run([sys.executable, __file__, "--cell", str(n), str(ranks), str(seed)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"did not finish in {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {**cell, "error": f"exit code {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return {**cell, **json.loads(done.stdout.strip().splitlines()[-1])}


def cells_text(d: dict) -> str:
    if "error" in d:
        return f"{d['error']} | | | | |"
    return (f"{d['seconds']:.2f} ({d['cpu_seconds']:.2f}) | {d['step_ms']:.2f} | {d['time_vs_mean']:.3f} | "
            f"{d['max_memory_gb']:.1f} | {d['memory_vs_mean']:.3f} |")


COLUMNS = ["planning s (CPU s)", "slowest rank ms", "slowest / mean", "largest rank GB", "largest / mean"]


def plot(cells: list[dict], path: str) -> None:
    """Planning seconds against tables x ranks, one line per rank count (dashed: --against's), and a
    line of slope 1 (time proportional to tables x ranks) through the largest case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, ranks in enumerate(sorted({d["ranks"] for d in cells})):
        for key, style in (("this", "o-"), ("against", "x--")):
            done = [c for c in cells if c["ranks"] == ranks]
            done = [d for d in (c if key == "this" else c.get("against", {}) for c in done) if "seconds" in d]
            if done:
                ax.loglog([d["tables"] * d["ranks"] for d in done], [d["seconds"] for d in done], style,
                          color=f"C{k}", label=f"{ranks} ranks" + (" (before)" if key == "against" else ""))
    top = max((c for c in cells if "seconds" in c), key=lambda c: c["tables"] * c["ranks"], default=None)
    if top:
        x = [1e3, top["tables"] * top["ranks"]]
        ax.loglog(x, [top["seconds"] * v / x[1] for v in x], ":", color="gray", label="slope 1")
    ax.set_xlabel("tables x ranks")
    ax.set_ylabel("planning seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tables", type=int, nargs="+", default=[100, 300, 1000, 3000, 10000])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    p.add_argument("--against", help="another checkout (its `sharding` planned alternately with this one's)")
    p.add_argument("--json", help="write the cells here")
    p.add_argument("--plot", help="write the log-log plot of planning time here (PNG)")
    p.add_argument("--cell", type=int, nargs=3, help=argparse.SUPPRESS)  # tables ranks seed: one cell, as JSON
    args = p.parse_args()
    if args.cell:
        print(json.dumps(plan_cell(*args.cell)))
        return 0
    trees = [("this", REPO)] + ([("against", args.against)] if args.against else [])
    print(f"{PRESET}, {OPTIMIZER}, tables fill at most {FILL:.0%} of the ranks' memory; trees: "
          + ", ".join(f"{name} {path}" for name, path in trees), flush=True)
    print("| tables | ranks | batch per rank | " + " | ".join(f"{name}: {c}" for name, _ in trees for c in COLUMNS)
          + " |\n|" + "---|" * (3 + len(COLUMNS) * len(trees)), flush=True)
    cells = []
    for k, (n, ranks) in enumerate((n, ranks) for n in args.tables for ranks in args.ranks):
        order = trees if k % 2 == 0 else trees[::-1]  # alternate which tree plans first
        got = {name: run_cell(n, ranks, args.seed, args.timeout, tree) for name, tree in order}
        cells.append({**got["this"], **({"against": got["against"]} if args.against else {})})
        print(f"| {n:,} | {ranks} | {batch_per_rank(n):,} | " + " ".join(cells_text(got[name]) for name, _ in trees),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells, f, indent=1)
    if args.plot:
        plot(cells, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
