"""Foundation benchmarks on this machine: synth and loader rows/s, training samples/s at 1 and 2 ranks.

    .venv/bin/python benchmarks/foundation.py --config configs/demo.toml --steps 300

Prints a Markdown table for docs/benchmarks.md. The loader is measured alone (one rank's share of the
global batches, as in a 2-rank job) and set beside what the trainer consumes per rank, so the ratio says
whether data loading can keep up.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from distrec.config import load_config
from distrec.data.loader import make_loader
from distrec.data.manifest import read_manifest
from distrec.tools.data.synth import synthesize
from distrec.trainer.dist import DistContext

import torch


def synth_rate(config: str, out: Path) -> float:
    cfg = load_config(config)
    start = time.perf_counter()
    synthesize(cfg, out)
    return (cfg.synth.train_rows + cfg.synth.eval_rows) / (time.perf_counter() - start)


def loader_rate(config: str, data: Path, rank: int, world: int, batches: int) -> float:
    cfg = load_config(config, [f"--data.path={data}"])
    ctx = DistContext(rank, world, rank, torch.device("cpu"), "none")
    loader = make_loader(cfg, read_manifest(data), "train", ctx, train=True)
    rows, start = 0, time.perf_counter()
    for i, batch in enumerate(loader.epoch(0)):
        rows += len(batch)
        if i + 1 >= batches:
            break
    return rows / (time.perf_counter() - start)


def train_rate(config: str, data: Path, world: int, steps: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "distrec.train", "--config", config, f"--data.path={data}", f"--train.max_steps={steps}",
           "--train.progress_bar=false", "--eval.max_rows=8192"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"\| ([\d,]+) samples/s", out).group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--data", default="runs/bench/data")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    data = Path(args.data)
    rows = [("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")]
    if not (data / "manifest.json").exists():
        rows.append(("`data synth` rows/s (2 threads)", f"{synth_rate(args.config, data):,.0f}"))
    one = loader_rate(args.config, data, 0, 1, args.steps)
    half = loader_rate(args.config, data, 0, 2, args.steps)
    t1, t2 = train_rate(args.config, data, 1, args.steps), train_rate(args.config, data, 2, args.steps)
    rows += [
        ("loader rows/s, 1 rank reading everything", f"{one:,.0f}"),
        ("loader rows/s, rank 0 of 2 (its half)", f"{half:,.0f}"),
        ("training samples/s, 1 rank", f"{t1:,.0f}"),
        ("training samples/s, 2 ranks (global)", f"{t2:,.0f}"),
        ("2-rank speed-up", f"{t2 / t1:.2f}x"),
        ("loader ÷ trainer consumption per rank (2 ranks)", f"{half / (t2 / 2):.1f}x"),
    ]
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
