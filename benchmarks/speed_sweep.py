"""distrec ÷ TorchRec over a sweep of shapes we did not pick for ourselves: the sparse part alone and
the whole DLRM step, both frameworks alternating in one sitting (issue 15's benchmark).

    .venv/bin/python benchmarks/speed_sweep.py --steps 20 --repeats 2 [--only dim=128,hot=20] [--parts sparse]

The base shape is the one a user reported (26 tables × 100k rows × dim 64, one-hot Zipf ids, 13 dense,
bottom MLP 256-64, top 512-256-1, batch 2048 per rank, 2 ranks, table-wise, row-wise Adagrad fused into
backward, Adam on the dense part). Each other shape changes one axis of it: dims 16 / 128; tables of
1e3 / 1e6 rows; 20 ids per bag; uniform ids; 1 / 4 ranks; row-wise and distrec's planner's plan (TorchRec
gets the same placement). Every rank runs one thread (OMP_NUM_THREADS=1), as DDP users do, so that 1, 2
and 4 ranks share this machine's cores alike.

Per shape and part: distrec (its default kernel: ``--kernel``) and TorchRec's DMP (fbgemm's fused CPU op)
alternate ``--repeats`` times, the best run of each counts (``benchmarks/torchrec_peer.py``'s machinery:
fixed batches made before timing, a warm-up, the slowest rank's wall seconds). Prints one Markdown table,
then the kernels each side used.
"""
from __future__ import annotations

import argparse
import platform
from dataclasses import replace

import torch

from torchrec_peer import Setup, best, measure_pair, ratio
from sharding.types import TableConfig

BASE_TABLES, BASE_ROWS, BASE_DIM = 26, 100_000, 64


def base_setup(dim: int = BASE_DIM, rows: int = BASE_ROWS) -> Setup:
    tables = tuple(TableConfig(f"t{i}", rows, dim) for i in range(BASE_TABLES))
    return Setup(tables, num_dense=13, bottom_mlp=(256, dim), top_mlp=(512, 256), batch_per_rank=2048, world=2,
                 plan="table_wise", hot=1, ids="zipf", optimizer="rowwise_adagrad")


def sweep() -> list[tuple[str, Setup]]:
    """(label, shape): the base, then one axis changed at a time."""
    base = base_setup()
    return [("base", base),
            ("dim=16", base_setup(dim=16)), ("dim=128", base_setup(dim=128)),
            ("rows=1e3", base_setup(rows=1_000)), ("rows=1e6", base_setup(rows=1_000_000)),
            ("hot=20", replace(base, hot=20)), ("ids=uniform", replace(base, ids="uniform")),
            ("ranks=1", replace(base, world=1, plan="table_wise")), ("ranks=4", replace(base, world=4)),
            ("plan=row_wise", replace(base, plan="row_wise")), ("plan=planner", replace(base, plan="planner"))]


def describe(setup: Setup) -> str:
    t = setup.tables[0]
    return (f"{len(setup.tables)}×{t.num_rows:.0e}×{t.dim}, hot {setup.hot}, {setup.ids}, {setup.world} "
            f"rank{'s' if setup.world > 1 else ''}, {setup.plan}")


def row(label: str, setup: Setup, ours: dict, theirs: dict) -> str:
    def rate(res):
        return f"{res['samples_s']:,.0f}" if "samples_s" in res else "failed"

    def times(key):
        r = ratio(ours, theirs, key)
        return f"**{r:.2f}×**" if r is not None and key == "samples_s" else (f"{r:.2f}×" if r is not None else "-")

    return (f"| {label} | {describe(setup)} | {setup.part} | {rate(ours)} | {rate(theirs)} | {times('samples_s')} | "
            f"{times('samples_cpu_s')} |")


def errors(label: str, part: str, runs: list[dict], who: str) -> list[str]:
    res = best(runs)
    return [f"- {label} {part} {who} failed: {res['error'].strip().splitlines()[-1]}"] if "error" in res else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=2, help="runs per framework and shape, alternating")
    p.add_argument("--parts", default="sparse,dlrm", help="comma list of: sparse, dlrm")
    p.add_argument("--only", default="", help="comma list of shape labels to run (default: all)")
    p.add_argument("--kernel", default="auto", help="distrec's lookup kernel (--plan.kernel)")
    args = p.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    rows, notes, kernels = [], [], {}
    for label, shape in sweep():
        if only and label not in only:
            continue
        for part in args.parts.split(","):
            setup = replace(shape, part=part)
            ours, theirs = measure_pair(setup, args.steps, args.repeats, args.kernel)
            rows.append(row(label, setup, best(ours), best(theirs)))
            print(rows[-1], flush=True)
            notes += errors(label, part, ours, "distrec") + errors(label, part, theirs, "TorchRec")
            for who, res in (("distrec", best(ours)), ("TorchRec", best(theirs))):
                if "ranks" in res:
                    kernels.setdefault(who, set()).add(res["ranks"][0]["kernel"])
    print(f"\nMachine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"{args.steps} timed steps after the warm-up, best of {args.repeats} alternating runs\n")
    print("| shape | tables × rows × dim, ids, ranks, plan | part | distrec samples/s | TorchRec samples/s | "
          "distrec ÷ TorchRec | same, per CPU-s |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n".join(notes))
    for who, names in kernels.items():
        print(f"- {who} kernels: {'; '.join(sorted(names))}")


if __name__ == "__main__":
    main()
