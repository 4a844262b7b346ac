"""Run the sweep: each run in its own processes, with a timeout and a folder of its own; a run that
fails or times out is recorded as failed and the sweep goes on.

    bench = Bench(out=Path("report"), opts=QUICK, data_rows=(150_000, 20_000), timeout_s=120)
    result = bench.run_one(spec)        # {"run_id", "status": "ok" | "failed" | "skipped", ...}

Every command is written to its run folder (``cmd.txt``) and into results.json, so a number in the
report leads back to the exact command that produced it.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distrec.tools.bench.matrix import MODELS, PS_STRATEGY, RunSpec, SweepOptions

ROOT = Path(__file__).resolve().parents[3]  # the repository (this file is distrec/tools/bench/runner.py)
ERROR_LINES = 12  # lines of a failed run's output kept in results.json
CALIBRATION_FILE = "calibration.json"  # this machine's measured rates, in the report folder
ACCURACY_EVALS = 4  # evaluations during an accuracy run (plus the final one): its AUC-vs-samples curve


@dataclass
class Bench:
    out: Path
    opts: SweepOptions
    data_rows: tuple[int, int]  # (train, eval) rows synthesized per model
    timeout_s: float
    eval_rows: int = 20_000
    evals_per_run: int = 2  # evaluations during a run (plus the final one): the AUC-vs-samples curve
    models: dict = field(default_factory=lambda: dict(MODELS))  # name -> ModelSpec (tests add small ones)

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.run_id

    def data_dir(self, model: str) -> Path:
        return self.out / "data" / model

    def model_args(self, spec: RunSpec) -> list[str]:
        """Config, data and the identical sample budget of every engine."""
        m = self.models[spec.model]
        logs = self.run_dir(spec) / "logs"
        evals = ACCURACY_EVALS if spec.purpose == "accuracy" else self.evals_per_run
        every = max(spec.steps // (evals + 1), 1)
        return ["--config", str(ROOT / m.config), *m.overrides, f"--data.path={self.data_dir(spec.model)}",
                f"--train.max_steps={spec.steps}", f"--train.global_batch_size={spec.global_batch}",
                "--train.progress_bar=false", f"--train.log_every_steps={max(spec.steps // 4, 1)}",
                f"--eval.max_rows={self.eval_rows}", f"--eval.every_steps={every}", f"--logging.dir={logs}"]

    def command(self, spec: RunSpec) -> list[str]:
        """The command of one run (the plan file of a "planner" run is made first, see ``plan_file``)."""
        py, n = sys.executable, str(spec.ranks)
        args = self.model_args(spec)
        placement = [f"--plan={self.plan_file(spec)}"] if spec.strategy == "planner" else \
            [f"--plan.default={spec.strategy}"]
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n]
        if spec.engine == "sync":
            return [*torchrun, "-m", "distrec.train", *args, *placement, f"--train.profile_steps={spec.steps}"]
        if spec.engine == "horovod":
            return [py, "-m", "horovod.runner.launch", "-np", n, "--gloo", py, "-m", "distrec.train", *args,
                    *placement, "--dense.engine=horovod", f"--train.profile_steps={spec.steps}"]
        if spec.engine == "torchrec":
            strategy = str(self.plan_file(spec)) if spec.strategy == "planner" else spec.strategy
            return [*torchrun, "-m", "distrec.tools.bench.torchrec_run", *args, "--strategy", strategy,
                    "--result", str(self.run_dir(spec) / "torchrec.json")]
        return [py, "-m", "distrec", "ps", "--workers", n, "--servers", "1", *args]

    def plan_file(self, spec: RunSpec) -> Path:
        return self.out / "plans" / f"{spec.model}-r{spec.ranks}-b{spec.global_batch}.json"

    def make_plan(self, spec: RunSpec) -> None:
        """The planner's choice for this model, rank count and batch on the ``cpu`` preset."""
        path = self.plan_file(spec)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        m = self.models[spec.model]
        rates = self.out / CALIBRATION_FILE
        cmd = [sys.executable, "-m", "distrec", "plan", "--gpus", str(spec.ranks), "--config", str(ROOT / m.config),
               "--preset", "cpu", "--json", str(path), "--calibration", str(rates) if rates.exists() else "none",
               *m.overrides, f"--train.global_batch_size={spec.global_batch}"]
        check(cmd, self.out / "plans" / f"{path.stem}.log", timeout=120)

    def calibrate(self) -> float:
        """This machine's rates (``distrec plan --calibrate`` on 2 ranks) into the report folder, once;
        returns seconds spent. The planner's plans and the projection's CPU estimates use them."""
        path = self.out / CALIBRATION_FILE
        if path.exists():
            return 0.0
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "distrec", "plan", "--calibrate", "--gpus", "2", "--config",
               str(ROOT / self.models[self.opts.models[0]].config), "--preset", "cpu", "--calibration", str(path)]
        check(cmd, self.out / "calibration.log", timeout=600)
        return time.perf_counter() - start

    def make_data(self, model: str) -> float:
        """Synthesize the model's data once; returns seconds spent (0 when it was there)."""
        if (self.data_dir(model) / "manifest.json").exists():
            return 0.0
        m, start = self.models[model], time.perf_counter()
        train, evals = self.data_rows
        cmd = [sys.executable, "-m", "distrec", "data", "synth", "--config", str(ROOT / m.config),
               "--out", str(self.data_dir(model)), *m.overrides, f"--synth.train_rows={train}",
               f"--synth.eval_rows={evals}", f"--synth.rows_per_file={max(train // 4, 1)}"]
        check(cmd, self.out / "data" / f"{model}.log", timeout=600)
        return time.perf_counter() - start

    def run_one(self, spec: RunSpec) -> dict:
        """One run in its own processes; never raises for the run's own failure."""
        base = {**spec.to_dict(), "command": ""}
        skip = skipped_reason(spec)
        if skip:
            return {**base, "status": "skipped", "error": skip}
        try:
            if spec.strategy == "planner":
                self.make_plan(spec)
            cmd = self.command(spec)
        except RuntimeError as e:
            return {**base, "status": "failed", "error": str(e)}
        return {**base, **execute(cmd, self.run_dir(spec), self.timeout_s, spec)}


def skipped_reason(spec: RunSpec) -> str:
    if spec.engine == "horovod" and importlib.util.find_spec("horovod") is None:
        return "skipped: horovod not installed (launch/install_horovod.sh .venv)"
    if spec.engine == "ps" and spec.strategy != PS_STRATEGY:
        return "skipped: the PS places rows by hash only"
    return ""


def env() -> dict:
    # One intra-op thread per process, as torchrun and horovodrun set: ranks share the cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def check(cmd: list[str], log: Path, timeout: float) -> None:
    """Run a preparation step; RuntimeError with its last lines when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env(), timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"`{shlex.join(cmd[1:4])} ...` failed (exit {proc.returncode}): "
                           + " | ".join(last_lines(log.read_text(), 4)))


def last_lines(text: str, n: int = ERROR_LINES) -> list[str]:
    return [ln for ln in text.strip().splitlines() if ln.strip()][-n:]


def run_group(cmd: list[str], out, timeout_s: float) -> int | None:
    """Exit code of ``cmd``, or None when it ran past ``timeout_s``; then its whole process group (the
    launcher and every rank it started) is killed, so no rank lingers into the next run."""
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env(), start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def execute(cmd: list[str], run_dir: Path, timeout_s: float, spec: RunSpec) -> dict:
    """Run ``cmd`` in ``run_dir``; the parsed result, or status "failed" with the output's last lines."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cmd.txt").write_text(shlex.join(cmd) + "\n")
    log, start = run_dir / "output.log", time.perf_counter()
    with open(log, "w") as f:
        code = run_group(cmd, f, timeout_s)
    wall = time.perf_counter() - start
    base = {"command": shlex.join(cmd), "wall_s": wall, "run_dir": str(run_dir)}
    from distrec.tools.bench.parse import parse_run

    try:
        parsed = parse_run(spec, run_dir, log.read_text())
    except (OSError, ValueError, KeyError, IndexError) as e:
        parsed = {"parse_error": f"{type(e).__name__}: {e}"}
    # TorchRec may abort at exit after writing its result: a written result is a success.
    ok = "samples_per_s" in parsed and (code == 0 or spec.engine == "torchrec")
    if ok:
        return {**base, "status": "ok", **parsed}
    why = "timed out after %.0f s" % timeout_s if code is None else f"exit code {code}"
    return {**base, "status": "failed", "error": f"{why}: " + error_summary(log.read_text()), **parsed}


def error_summary(text: str) -> str:
    """The lines that say what went wrong (a launcher's own report comes last, after the rank's
    ``error:`` line), then the output's last lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if "error:" in ln.lower() or ln.startswith(("Traceback", "RuntimeError"))]
    return "\n".join([*said[-4:], "...", *lines[-ERROR_LINES // 2:]] if said else lines[-ERROR_LINES:])
