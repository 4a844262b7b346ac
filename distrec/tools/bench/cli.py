"""The ``distrec bench`` command line.

    distrec bench --quick --out report/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from distrec.tools.bench.matrix import ENGINES, FULL, MODELS, QUICK, STRATEGIES, SweepOptions, sweep
from sharding.files import atomic_write

QUICK_DATA, FULL_DATA = (150_000, 10_000), (200_000, 10_000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="*", help="nothing: run the sweep | report RESULTS.json | compare A B")
    p.add_argument("--out", help="report folder: README.md, results.json, PNGs, runs/, data/")
    p.add_argument("--quick", action="store_true", help="demo model, ranks 1-2, few runs: under 5 minutes")
    p.add_argument("--repeats", type=int, help="runs per configuration (full: 3, quick: 1)")
    p.add_argument("--models", help=f"comma-separated: {','.join(MODELS)}")
    p.add_argument("--ranks", help="comma-separated rank counts, e.g. 1,2,4")
    p.add_argument("--strategies", help=f"comma-separated: {','.join(STRATEGIES)}")
    p.add_argument("--engines", help=f"comma-separated: {','.join(ENGINES)}")
    p.add_argument("--steps", type=int, help="global batches per run (the sample budget: steps x batch)")
    p.add_argument("--accuracy-workers", help="comma-separated async PS worker counts of the accuracy runs "
                   "(full: 2,8,16,32; 0: none), beside sync on 2 ranks at the same samples")
    p.add_argument("--accuracy-steps", type=int, help="global batches per accuracy run (full: 100, ~1 epoch)")
    p.add_argument("--timeout", type=float, default=0, help="seconds per run before it counts as failed")
    p.add_argument("--max-minutes", type=float, default=0,
                   help="start no run after this long; the report says how many were left out (repeats are "
                        "interleaved, so every configuration's first repeat comes first)")


def options(args: argparse.Namespace) -> SweepOptions:
    """The mode's options with the command line's changes."""
    base = QUICK if args.quick else FULL
    change = {}
    for name, allowed in (("models", MODELS), ("strategies", STRATEGIES), ("engines", ENGINES)):
        value = getattr(args, name)
        if value:
            items = tuple(v.strip() for v in value.split(","))
            bad = [v for v in items if v not in allowed]
            if bad:
                raise ValueError(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
            change[name] = items
    if args.ranks:
        change["ranks"] = tuple(int(r) for r in args.ranks.split(","))
    if args.repeats:
        change["repeats"] = args.repeats
    if args.steps:
        change["steps"] = args.steps
    if args.accuracy_workers:
        change["accuracy_workers"] = tuple(w for w in (int(x) for x in args.accuracy_workers.split(",")) if w > 0)
    if args.accuracy_steps:
        change["accuracy_steps"] = args.accuracy_steps
    return dataclasses.replace(base, **change)


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise ValueError(f"unknown arguments {' '.join(rest)}")
    if args.what[:1] == ["compare"]:
        from distrec.tools.bench.compare import main as compare_main

        return compare_main(args.what[1:])
    if args.what[:1] == ["report"]:
        return redraw(args)
    if args.what:
        raise ValueError(f"unknown bench command {args.what[0]!r}: expected report or compare")
    if not args.out:
        raise ValueError("--out DIR is required")
    return run_sweep(args, options(args))


def redraw(args: argparse.Namespace) -> int:
    from distrec.tools.bench.report import write_report

    if len(args.what) != 2:
        raise ValueError("usage: distrec bench report RESULTS.json [--out DIR]")
    path = Path(args.what[1])
    out = Path(args.out) if args.out else path.parent
    doc = json.loads(path.read_text())
    if "projection" not in doc and doc["runs"]:  # a sweep stopped before its end: complete results.json too
        from distrec.tools.bench.project import projection

        doc["projection"] = projection(doc, path.parent)
        save(path.parent, doc)
    write_report(doc, out)
    print(f"wrote {out / 'README.md'}")
    return 0


def run_sweep(args: argparse.Namespace, opts: SweepOptions) -> int:
    from tqdm import tqdm

    from distrec.tools.bench.machine import machine, versions
    from distrec.tools.bench.project import projection
    from distrec.tools.bench.report import write_report
    from distrec.tools.bench.runner import Bench

    out, start = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(out, opts, QUICK_DATA if args.quick else FULL_DATA,
                  timeout_s=args.timeout or (150 if args.quick else 600),
                  eval_rows=10_000, evals_per_run=1 if args.quick else 2)
    doc = {"format": 1, "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "command": "distrec bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
           "mode": "quick" if args.quick else "full", "options": dataclasses.asdict(opts),
           "machine": machine(), "versions": versions(), "data": {}, "runs": []}
    for model in opts.models:
        doc["data"][model] = data_entry(bench, model)
    if not args.quick and "sync" in opts.engines:  # measured rates: the planner's plans and the projection use them
        doc["calibration_s"] = bench.calibrate()
    specs = sweep(opts)
    for i, spec in enumerate(tqdm(specs, desc="distrec bench", unit="run", file=sys.stderr, dynamic_ncols=True)):
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            doc["not_run"] = [s.run_id for s in specs[i:]]
            break
        doc["runs"].append(bench.run_one(spec))
        save(out, doc)  # after every run: an interrupted sweep keeps what it measured
    doc["projection"] = projection(doc, out)
    doc["total_s"] = time.perf_counter() - start
    save(out, doc)
    write_report(doc, out)
    failed = sum(r["status"] == "failed" for r in doc["runs"])
    left = f", {len(doc['not_run'])} not started (--max-minutes)" if doc.get("not_run") else ""
    print(f"wrote {out / 'README.md'}, {out / 'results.json'}: {len(doc['runs'])} runs, {failed} failed{left}, "
          f"{doc['total_s']:.0f} s")
    return 0


def data_entry(bench, model: str) -> dict:
    seconds = bench.make_data(model)
    manifest = json.loads((bench.data_dir(model) / "manifest.json").read_text())
    return {"path": str(bench.data_dir(model)), "synth_s": seconds, "bayes_auc": manifest.get("bayes_auc"),
            "train_rows": manifest["splits"]["train"]["rows"], "eval_rows": manifest["splits"]["valid"]["rows"]}


def save(out: Path, doc: dict) -> None:
    atomic_write(out / "results.json", json.dumps(doc, indent=1))
