"""fp32 against every mixed-precision setting, alternating in one sitting: samples/s, final AUC and logloss
of the same seed, data and steps, for the demo model and a dense-heavy one, on 1 and 2 ranks, with
TorchRec's DistributedModelParallel under the same autocast beside the fp32 and bf16 runs.

    .venv/bin/python benchmarks/precision_sweep.py --data /tmp/pdata --repeats 2

``--data``: a folder from ``distrec data synth --config configs/demo.toml`` (both models read it). Each
run is ``torchrun -m distrec.train`` (or ``-m distrec.tools.bench.torchrec_run``) for ``--steps`` global
batches on a row-wise plan; samples/s is each trainer's own (training time only). Within a repeat the
settings run in a rotated order, so a drift of the machine's speed spreads over all of them.
"""
from __future__ import annotations

import argparse
import json
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
HALF_TABLES = ["--tables.precision=fp16", "--plan.comm_precision=bf16"]
SETTINGS = {  # name: (distrec's overrides, TorchRec's peer or None)
    "fp32": ([], "fp32"),
    "bf16 compute": (["--train.precision=bf16"], "bf16"),
    "fp16 compute": (["--train.precision=fp16"], None),  # the peer has no loss scaling here
    "fp16 tables + bf16 exchanges": (HALF_TABLES, None),
    "bf16 compute + fp16 tables + bf16 exchanges": (["--train.precision=bf16", *HALF_TABLES,
                                                    "--plan.dense_comm_precision=bf16"], None),
}
FINAL = re.compile(r"final: step \d+ \| auc ([\d.]+) \| logloss ([\d.]+) \| ([\d,]+) samples/s")


def _torchrun(ranks: int, module: str, common: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
            module, "--config", str(REPO / "configs/demo.toml"), *common]


def run_distrec(common: list[str], ranks: int, overrides: list[str], logs: Path) -> tuple[float, float, float]:
    """(samples/s, AUC, logloss)."""
    cmd = _torchrun(ranks, "distrec.train", [*common, f"--logging.dir={logs}", "--train.progress_bar=false",
                                             *overrides])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = FINAL.search(out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-1500:]}")
    return float(m[3].replace(",", "")), float(m[1]), float(m[2])


def run_torchrec(common: list[str], ranks: int, precision: str, result: Path) -> tuple[float, float, float]:
    cmd = _torchrun(ranks, "distrec.tools.bench.torchrec_run", [*common, f"--train.precision={precision}",
                                                                "--strategy", "row_wise", "--result", str(result)])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not result.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-1500:]}")
    r = json.loads(result.read_text())
    return r["samples_per_s"], r["auc"], r["logloss"]


def sweep(args, model: str, ranks: int, tmp: Path) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    common = [f"--data.path={args.data}", f"--train.global_batch_size={args.batch}", f"--train.max_steps={args.steps}",
              "--plan.default=row_wise", *MODELS[model]]
    names = ["fp32", *(s for s in args.settings if s != "fp32")]
    got = {name: {"distrec": [], "torchrec": []} for name in names}
    for k in range(args.repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            overrides, peer = SETTINGS[name]
            tag = f"{model}-{ranks}-{names.index(name)}-{k}"
            got[name]["distrec"].append(run_distrec(common, ranks, overrides, tmp / tag))
            if peer and not args.no_torchrec:
                got[name]["torchrec"].append(run_torchrec(common, ranks, peer, tmp / f"{tag}.json"))
    return got


def rows(model: str, ranks: int, got) -> list[str]:
    median = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    base_sps, base_auc = median(got["fp32"]["distrec"], 0), median(got["fp32"]["distrec"], 1)
    out = []
    for name, runs in got.items():
        sps, auc, loss = (median(runs["distrec"], i) for i in range(3))
        peer = ""
        if runs["torchrec"]:
            peer_sps = median(runs["torchrec"], 0)
            peer = f"{peer_sps:,.0f} | {sps / peer_sps:.2f}x | {median(runs['torchrec'], 1):.4f}"
        out.append(f"| {model} | {ranks} | {name} | {sps:,.0f} | {sps / base_sps:.2f}x | {auc:.4f} | "
                   f"{auc - base_auc:+.4f} | {loss:.4f} | {peer or '- | - | -'} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096, help="global batch")
    p.add_argument("--steps", type=int, default=90, help="global batches per run")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-torchrec", action="store_true", help="distrec's runs only")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                   help="a subset (fp32, the baseline, is always run)")
    args = p.parse_args()
    print("| model | ranks | setting | samples/s | ÷ fp32 | AUC | AUC - fp32 | logloss | TorchRec samples/s "
          "(same autocast) | distrec ÷ TorchRec | TorchRec AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for ranks in args.ranks:
                print("\n".join(rows(model, ranks, sweep(args, model, ranks, Path(tmp)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
