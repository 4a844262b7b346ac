"""fp32 against bf16 compute (``train.precision``), alternating in one sitting: samples/s and final AUC
of the same seed, data and steps, for the demo model and a dense-heavy one, on 1 and 2 ranks.

    .venv/bin/python benchmarks/precision_sweep.py --data /tmp/pdata --repeats 2

``--data``: a folder from ``distrec data synth --config configs/demo.toml`` (both models read it). Each
run is ``torchrun -m distrec.train`` for one epoch; samples/s is the trainer's own (training time only).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "demo": [],  # configs/demo.toml: bottom 64-16, top 64-32
    "dense-heavy": ["--model.bottom_mlp=[512,256,16]", "--model.top_mlp=[1024,1024,512,256]"],
}
FINAL = re.compile(r"final: step \d+ \| auc ([\d.]+) \| logloss ([\d.]+) \| ([\d,]+) samples/s")


def run(data: str, model: str, ranks: int, precision: str, batch: int, logs: Path) -> tuple[float, float]:
    """(samples/s, AUC) of one epoch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
           "distrec.train", "--config", str(REPO / "configs/demo.toml"), f"--data.path={data}",
           f"--logging.dir={logs}", f"--train.global_batch_size={batch}", f"--train.precision={precision}",
           "--train.progress_bar=false", "--plan.default=row_wise", *MODELS[model]]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = FINAL.search(out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-1500:]}")
    return float(m[3].replace(",", "")), float(m[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    print("| model | ranks | fp32 samples/s | bf16 samples/s | bf16 / fp32 | fp32 AUC | bf16 AUC | bf16 - fp32 AUC |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for ranks in args.ranks:
                got: dict[str, list[tuple[float, float]]] = {"fp32": [], "bf16": []}
                for k in range(args.repeats):
                    for precision in ("fp32", "bf16") if k % 2 == 0 else ("bf16", "fp32"):
                        logs = Path(tmp) / f"{model}-{ranks}-{precision}-{k}"
                        got[precision].append(run(args.data, model, ranks, precision, args.batch, logs))
                sps = {p: statistics.median(x[0] for x in v) for p, v in got.items()}
                auc = {p: statistics.median(x[1] for x in v) for p, v in got.items()}
                gain = sps["bf16"] / sps["fp32"]
                print(f"| {model} | {ranks} | {sps['fp32']:,.0f} | {sps['bf16']:,.0f} | {gain:.2f}x | "
                      f"{auc['fp32']:.4f} | {auc['bf16']:.4f} | {auc['bf16'] - auc['fp32']:+.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
