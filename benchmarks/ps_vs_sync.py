"""Async PS (W workers + S servers) vs the sync trainer (2 gloo ranks): same data, same samples.

    .venv/bin/python benchmarks/ps_vs_sync.py --config configs/demo.toml --data runs/bench/data --steps 60

Runs `torchrun --standalone --nproc_per_node 2 -m distrec.train` and `distrec ps`, each with
``--train.max_steps=STEPS`` (so both see STEPS global batches), and prints a Markdown table for
docs/benchmarks.md from their metrics.jsonl files. Split over W workers, the PS makes W times as many
(W times smaller) updates as sync; a third run ("same updates") gives each PS worker whole sync-sized
batches (global batch x W, STEPS / W global batches): same samples, same number and size of updates,
so only staleness differs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distrec.config import load_config

BIN = Path(sys.executable).parent


def last(log_dir: Path, kind: str) -> dict:
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind][-1]


def run(cmd: list[str], log_dir: Path) -> tuple[str, float]:
    """Run ``cmd``; returns (its final summary line, wall seconds)."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"ps_vs_sync: error: {cmd[0]} failed:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--data", default="runs/bench/data")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--out", default="runs/ps_vs_sync")
    a = p.parse_args()
    common = ["--config", a.config, f"--data.path={a.data}", f"--train.max_steps={a.steps}",
              "--train.progress_bar=false", "--train.log_every_steps=10"]
    sync_dir, ps_dir = Path(a.out) / "sync", Path(a.out) / "ps"
    sync = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "distrec.train", *common,
            f"--logging.dir={sync_dir}"]
    ps = [str(BIN / "distrec"), "ps", "--workers", str(a.workers), "--servers", str(a.servers), *common,
          f"--logging.dir={ps_dir}"]
    same_dir = Path(a.out) / "ps_same_updates"
    batch = load_config(a.config).train.global_batch_size
    same = [*ps[:-1], f"--train.global_batch_size={batch * a.workers}",
            f"--train.max_steps={a.steps // a.workers}", f"--logging.dir={same_dir}"]
    ps_name = f"async PS, {a.workers} workers + {a.servers} server"
    results = {}
    for name, cmd, log_dir in [("sync, 2 gloo ranks", sync, sync_dir), (ps_name, ps, ps_dir),
                               (ps_name + ", same updates", same, same_dir)]:
        final, wall = run(cmd, log_dir)
        train = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in train if r["kind"] == "train"]
        stale = [r.get("staleness_mean") for r in train if "staleness_mean" in r]
        results[name] = (final, wall, last(log_dir, "eval"), train, stale)
    print("| run | samples | AUC | logloss | samples/s | staleness mean / p99 | wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, (final, wall, ev, train, stale) in results.items():
        rate = final.split("|")[3].strip()
        st = final.split("staleness mean ")[1].replace(" p99 ", " / ") if "staleness" in final else "0 (sync)"
        print(f"| {name} | {train[-1]['samples']:,} | {ev['auc']:.4f} | {ev['logloss']:.4f} | {rate} | {st} | {wall:.0f} |")


if __name__ == "__main__":
    main()
