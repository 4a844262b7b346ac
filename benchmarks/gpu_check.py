"""One prepared GPU check: the project's GPU claims measured on one GPU by one command (issue 21).

    benchmarks/gpu_check.sh                       # the GPU machine: under 8 minutes; $OUT/gpu_check.{json,md}
    benchmarks/gpu_check.sh --dry-run --out DIR   # CPU: the same steps on tiny shapes, Triton interpreted

Steps, each timed and recorded; one that fails does not stop the others, and the exit status is 1 when a
correctness step failed:

1. versions: the device, its driver, torch, CUDA, Triton;
2. correctness on the device: distrec's Triton kernels against the plain-PyTorch reference on the same
   device (tests/tbe_reference.py's checks and tolerances) for every optimizer, fp32 tables (multi-hot with
   duplicate ids and empty bags, with and without per-sample weights, and one-hot) and fp16/bf16 ones
   (rounded exactly as sharding.rounding, stochastically and to nearest; sub-ulp updates survive); the
   sharded runtime on one rank with the Triton kernel against its torch kernel; the trainer for a few
   hundred steps of the demo model on the device against the CPU run of the same seed;
3. two ranks sharing the one device (gloo over CUDA tensors: NCCL refuses two ranks on one GPU);
4. benchmarks: benchmarks/triton_tbe.py at Criteo-TB shapes (bytes/s as a fraction of the GPU's memory
   bandwidth beside F.embedding_bag + the same update; DLRM training samples/s with bf16 and fp32 MLPs);
5. the report: gpu_check.json and gpu_check.md under --out (default $OUT, else runs/gpu_check).

Nothing is installed: it needs the machine's torch (and Triton on the GPU), numpy and pyarrow, and files
of this repository only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The trainer's comparison, device against CPU for the same seed and steps. Stated, not derived: the two
# runs use other kernels (Triton against the C++ one) and other matmul libraries, whose float32 sums round
# apart, and Adam turns those differences into a different but equally good trajectory. A broken device
# path shows as an AUC near 0.5, a NaN, or tables off by their whole scale.
AUC_ATOL = 0.01
LOSS_RTOL = 0.02  # the last logged training loss
TABLE_RTOL = 0.05  # |W_device - W_cpu| / |W_cpu| over every table (Frobenius)


@dataclass
class Step:
    name: str
    kind: str  # "info" | "correctness" | "benchmark"
    ok: bool = True
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Shapes:
    """What each step runs: the GPU's shapes, or tiny ones for --dry-run."""

    train_rows: int
    steps: int
    global_batch: int
    bench_args: list[str]


GPU = Shapes(train_rows=400_000, steps=200, global_batch=4096, bench_args=[])
DRY = Shapes(train_rows=6_000, steps=10, global_batch=512, bench_args=["--smoke"])


def run_step(steps: list[Step], name: str, kind: str, fn) -> Step:
    step, start = Step(name, kind), time.perf_counter()
    try:
        step.data = fn() or {}
    except Exception as e:  # recorded, and the check goes on with the next step
        step.ok, step.detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
    step.seconds = time.perf_counter() - start
    steps.append(step)
    print(f"[{'ok' if step.ok else 'FAILED'}] {name} ({step.seconds:.1f} s)" + (f": {step.detail}" if not step.ok else ""),
          flush=True)
    return step


def versions(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name(0)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
        info["device"] = f"CPU {model[1] if model else platform.processor()} (dry run: Triton interpreted)"
    return info


def kernels(device: str) -> dict:
    """The Triton kernels against the plain-PyTorch reference, both on ``device``."""
    from sharding.kernels.triton_tbe import TritonTBE
    from sharding.optim import KINDS, OptimSpec
    from tests.tbe_reference import (BATCH, OPTIM, SHAPES, Reference, check_half_storage_rounds_like_the_reference,
                                     check_sub_ulp_updates_survive, train_three_steps_against)
    import torch

    checked = []
    for kind in KINDS:
        optim = OptimSpec(kind, **OPTIM, l2=0.01 if kind == "adagrad" else 0.0)
        for weighted, max_bag in ((False, 5), (True, 5), (True, 1)):  # max_bag 1: one-hot (and empty) bags
            tbe = TritonTBE(SHAPES, optim, device=device)
            ref = Reference(tbe.table_weights(), tbe.optim, max_bag=max_bag, n_step=BATCH * max_bag + 4)
            train_three_steps_against(tbe, ref, seed=7, weighted=weighted, max_bag=max_bag)
            checked.append(f"{kind} fp32 {'weighted' if weighted else 'unweighted'} max_bag={max_bag}")

        def make(dtype, stochastic, shapes=SHAPES, spec=optim):
            return TritonTBE(shapes, spec, dtype=dtype, device=device, stochastic_rounding=stochastic)
        for dtype in (torch.float16, torch.bfloat16):
            for stochastic in (True, False):
                check_half_storage_rounds_like_the_reference(make, dtype, kind, stochastic)
                checked.append(f"{kind} {dtype} {'stochastic' if stochastic else 'nearest'}")
    for dtype in (torch.float16, torch.bfloat16):
        check_sub_ulp_updates_survive(lambda d, s, shapes, spec: TritonTBE(shapes, spec, dtype=d, device=device,
                                                                           stochastic_rounding=s), dtype)
        checked.append(f"sub-ulp {dtype}")
    return {"checked": checked}


def runtime(device: str) -> dict:
    from sharding.optim import KINDS
    from tests.tbe_reference import check_sharded_collection_matches_torch_kernel

    kernels_here = ["triton"] + (["cpu"] if device == "cpu" else [])
    for kernel in kernels_here:
        for kind in KINDS:
            check_sharded_collection_matches_torch_kernel(kernel, kind, device)
    return {"kernels": kernels_here, "optimizers": list(KINDS)}


def python(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def checked(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return r


def synth(work: Path, shapes: Shapes) -> Path:
    data = work / "data"
    if not (data / "manifest.json").exists():
        checked(python("-m", "distrec", "data", "synth", "--config", "configs/demo.toml", "--out", str(data),
                       f"--synth.train_rows={shapes.train_rows}", f"--synth.eval_rows={shapes.train_rows // 10}"),
                "distrec data synth")
    return data


def train(work: Path, shapes: Shapes, name: str, device: str, ranks: int = 1, *extra: str) -> dict:
    """One run of the demo model: its final AUC, last training loss and checkpoint folder."""
    data, logs, ckpt = synth(work, shapes), work / name / "logs", work / name / "ckpt"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    r = checked(python(*launcher, "-m", "distrec.train", "--config", "configs/demo.toml", f"--data.path={data}",
                       f"--train.device={device}", f"--train.max_steps={shapes.steps}",
                       f"--train.global_batch_size={shapes.global_batch}", f"--logging.dir={logs}",
                       f"--checkpoint.dir={ckpt}", "--train.progress_bar=false", "--plan.default=row_wise",
                       "--train.log_every_steps=10", *extra), f"distrec.train on {device} x{ranks}")
    recs = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in recs if x["kind"] == "eval"][-1]
    loss = [x["loss"] for x in recs if x["kind"] == "train"][-1]
    kernel = re.search(r"embedding kernel: (\w+)", r.stdout)
    return {"auc": final["auc"], "loss": loss, "ckpt": str(ckpt), "kernel": kernel[1] if kernel else None}


def tables_of(ckpt: str) -> dict:
    from distrec.trainer.checkpoint import load_latest
    from sharding.checkpoint import whole_tables

    return {p["table"]: p["weight"].float() for p in whole_tables(load_latest(ckpt)["shards"], "adagrad")}


def compare(got: dict, want: dict) -> dict:
    """The stated tolerances (module constants) between two runs of the same seed; raises if off."""
    import torch

    mine, ref = tables_of(got["ckpt"]), tables_of(want["ckpt"])
    num = sum(float(torch.linalg.vector_norm(mine[n] - ref[n]) ** 2) for n in ref) ** 0.5
    rel = num / sum(float(torch.linalg.vector_norm(ref[n]) ** 2) for n in ref) ** 0.5
    out = {"auc": got["auc"], "auc_cpu": want["auc"], "loss": got["loss"], "loss_cpu": want["loss"],
           "tables_rel_diff": rel, "kernel": got["kernel"]}
    bad = [f"AUC {got['auc']:.4f} vs {want['auc']:.4f}"] if abs(got["auc"] - want["auc"]) > AUC_ATOL else []
    bad += [f"loss {got['loss']:.4f} vs {want['loss']:.4f}"] if abs(got["loss"] - want["loss"]) > LOSS_RTOL * want["loss"] else []
    bad += [f"tables differ by {rel:.3g} (relative)"] if not rel <= TABLE_RTOL else []
    if bad:
        raise AssertionError("; ".join(bad) + f" (tolerances: AUC {AUC_ATOL}, loss {LOSS_RTOL:.0%}, tables {TABLE_RTOL:.0%})")
    return out


def bench(shapes: Shapes, *args: str) -> dict:
    r = checked(python("benchmarks/triton_tbe.py", *shapes.bench_args, *args, timeout=420), "benchmarks/triton_tbe.py")
    return {"markdown": r.stdout}


def report(out: Path, info: dict, steps: list[Step], dry: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"dry_run": dry, "versions": info,
                                                    "steps": [asdict(s) for s in steps]}, indent=1))
    lines = [f"# GPU check{' (dry run on CPU)' if dry else ''}", "",
             "; ".join(f"{k} {v}" for k, v in info.items()), "", "## Steps", "",
             "| step | kind | result | seconds |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.kind} | {'ok' if s.ok else 'FAILED: ' + s.detail.splitlines()[0][:200]} | "
              f"{s.seconds:.1f} |" for s in steps]
    for s in steps:
        if s.kind == "correctness" and s.ok and "auc" in s.data:
            lines += ["", f"{s.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in s.data.items() if k != "ckpt")]
        if "markdown" in s.data:
            lines += ["", f"## {s.name}", "", s.data["markdown"]]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on tiny shapes, on the CPU")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"))
    args = p.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported: before anything imports it
    sys.path.insert(0, str(REPO))
    import torch

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    shapes, out, steps = DRY if dry else GPU, Path(args.out), []
    work = out / "work"
    info = run_step(steps, "versions", "info", lambda: versions(device)).data
    run_step(steps, "Triton kernels vs the plain-PyTorch reference", "correctness", lambda: kernels(device))
    run_step(steps, "sharded runtime, 1 rank, each kernel vs torch", "correctness", lambda: runtime(device))
    cpu_run = run_step(steps, "trainer on the CPU (the reference run)", "info",
                       lambda: train(work, shapes, "cpu", "cpu"))
    # The Triton kernel on both: on a GPU "auto" picks it anyway; on the dry run's CPU it would pick the C++ one
    dev_run = run_step(steps, f"trainer on {device}", "info",
                       lambda: train(work, shapes, "device", device, 1, "--plan.kernel=triton"))
    if cpu_run.ok and dev_run.ok:
        run_step(steps, f"trainer on {device} vs CPU, same seed", "correctness",
                 lambda: compare(dev_run.data, cpu_run.data))
    if cpu_run.ok:
        run_step(steps, f"2 ranks sharing the {device} vs 1 rank on CPU", "correctness",
                 lambda: compare(train(work, shapes, "two", device, 2, "--plan.kernel=triton"), cpu_run.data))
    run_step(steps, "benchmarks/triton_tbe.py (fp32 tables, bf16 MLPs)", "benchmark", lambda: bench(shapes))
    run_step(steps, "benchmarks/triton_tbe.py (fp32 MLPs end to end)", "benchmark",
             lambda: bench(shapes, "--pooling", "1", "--impls", "triton", "--e2e-precision", "fp32"))
    run_step(steps, "benchmarks/triton_tbe.py (bf16 tables)", "benchmark",
             lambda: bench(shapes, "--dtype", "bf16", "--e2e-steps", "0", "--impls", "triton,torch"))
    report(out, info, steps, dry)
    failed = [s.name for s in steps if not s.ok and s.kind == "correctness"]
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "every correctness check passed"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
