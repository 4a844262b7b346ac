"""Bad input and faults, one row each: exit code, seconds to exit, the first error line, and whether the
latest checkpoint still loads afterwards. The table goes into docs/reliability.md.

    python -m benchmarks.fault_matrix                       # every case, on small synthetic data (~4 min)
    python -m benchmarks.fault_matrix --cases typo,kill-rank

Each case runs the real commands (``python -m distrec.train``, torchrun, ``distrec reshard``,
``distrec ps``) in subprocesses with timeouts, so no case can hang the script.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distrec.config import load_config
from distrec.tools.data.synth import synthesize
from distrec.trainer.checkpoint import CheckpointError, open_latest
from tests.conftest import SMALL_TOML

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


class Case:
    def __init__(self, root: Path):
        self.root, self.cfg, self.data = root, root / "small.toml", root / "data"

    def train_cmd(self, name: str, *more: str, ranks: int = 1) -> list[str]:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        return [sys.executable, *launch, "-m", "distrec.train", "--config", str(self.cfg), f"--data.path={self.data}",
                f"--logging.dir={self.root / name / 'logs'}", f"--checkpoint.dir={self.ckpt(name)}",
                "--checkpoint.every_steps=5", "--checkpoint.keep=3", *more]

    def ckpt(self, name: str) -> Path:
        return self.root / name / "ckpt"


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run(cmd: list[str]) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO, env=env())
        return r.returncode, time.monotonic() - start, r.stderr + "\n" + r.stdout
    except subprocess.TimeoutExpired:
        return 124, time.monotonic() - start, "timed out"


def first_error(text: str) -> str:
    keys = ("error", "Error", "passed over", "refused", "no usable checkpoint", "died")
    line = next((x for x in text.splitlines() if any(k in x for k in keys)), "")
    return line.strip()[:160]


def loads(ckpt_dir: Path) -> str:
    """Whether the newest committed checkpoint verifies and every file of it loads."""
    try:
        ckpt = open_latest(ckpt_dir, warn=lambda _: None)
        if ckpt is None:
            return "none"
        ckpt.full_state()
        return f"yes ({ckpt.path.name})"
    except CheckpointError as e:
        return f"no: {str(e)[:80]}"


def killed_during(c: Case, name: str, cmd: list[str], when) -> tuple[int, float, str]:
    """Start ``cmd`` in its own process group, SIGKILL one of its processes once ``when()`` gives a pid."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    pid = None
    while pid is None and time.monotonic() < deadline and proc.poll() is None:
        pid = when(proc)
        time.sleep(0.02)
    start = time.monotonic()
    if pid:
        os.kill(pid, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return proc.returncode, time.monotonic() - start, err + "\n" + out


def children(pid: int) -> list[int]:
    found = []
    for p in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found += [int(p), *children(int(p))]
        except OSError:
            continue
    return found


def tamper(step: Path, name: str, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")
    state = torch.load(step / name, weights_only=True)
    state["payload"] = Payload()
    torch.save(state, step / name)
    index = json.loads((step / "index.json").read_text())
    data = (step / name).read_bytes()
    index["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "index.json").write_text(json.dumps(index))


def trained(c: Case, name: str, steps: int = 10, ranks: int = 1) -> None:
    code, _, text = run(c.train_cmd(name, f"--train.max_steps={steps}", ranks=ranks))
    assert code == 0, text[-2000:]


def case_rows(c: Case, selected: set[str] | None):
    def want(n):
        return selected is None or n in selected

    def resume(name, *more, ranks=1):
        return run(c.train_cmd(name, "--train.max_steps=12", "--checkpoint.resume=true", *more, ranks=ranks))

    if want("typo"):
        yield "config typo (--train.max_stepz)", run(c.train_cmd("typo", "--train.max_stepz=5")), c.ckpt("typo")
    if want("type"):
        yield "wrong type (--train.max_steps=abc)", run(c.train_cmd("type", "--train.max_steps=abc")), c.ckpt("type")
    if want("plan-mismatch"):
        plan = c.root / "demo_plan.json"
        run([sys.executable, "-m", "distrec", "plan", "--gpus", "1", "--config", "configs/demo.toml", "--json", str(plan)])
        yield "plan for other tables", run(c.train_cmd("plan", f"--plan.file={plan}")), c.ckpt("plan")
    for what in ("rank_0.pt", "common.pt"):
        if want("truncated"):
            name = f"trunc-{what}"
            trained(c, name)
            f = c.ckpt(name) / "step_10" / what
            f.write_bytes(f.read_bytes()[:200])
            yield f"truncated {what}, resume", resume(name), c.ckpt(name)
    if want("no-index"):
        trained(c, "noindex")
        (c.ckpt("noindex") / "step_10" / "index.json").unlink()
        yield "missing index.json, resume", resume("noindex"), c.ckpt("noindex")
    if want("other-dim"):
        trained(c, "dim")
        yield "resume with --tables.dim=4", resume("dim", "--tables.dim=4", "--model.bottom_mlp=[16, 4]"), c.ckpt("dim")
    if want("unwritable"):
        (c.root / "afile").write_text("x")
        cmd = c.train_cmd("unw", "--train.max_steps=5") + [f"--checkpoint.dir={c.root / 'afile' / 'ckpt'}"]
        yield "checkpoint dir under a regular file", run(cmd), c.root / "afile" / "ckpt"
    if want("pickle"):
        for what in ("common.pt", "rank_0.pt"):
            name = f"pickle-{what}"
            trained(c, name)
            tamper(c.ckpt(name) / "step_10", what, c.root / f"marker-{what}")
            code, s, text = resume(name)
            ran = "RAN" if (c.root / f"marker-{what}").exists() else "did not run"
            yield f"pickled callable in {what} (code {ran})", (code, s, text), c.ckpt(name)
    if want("two-runs"):
        first = subprocess.Popen(c.train_cmd("two", "--train.epochs=50"), cwd=REPO, env=env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lock = c.root / "two" / "logs" / "metrics.jsonl"
        while not lock.exists() and first.poll() is None:
            time.sleep(0.1)
        result = run(c.train_cmd("two", "--train.max_steps=3"))
        first.kill()
        first.wait()
        yield "second run in the same folders", result, c.ckpt("two")
    if want("reshard"):
        trained(c, "rs", ranks=2)
        run([sys.executable, "-m", "distrec", "reshard", "--checkpoint", str(c.ckpt("rs")), "--out",
             str(c.ckpt("rs3")), "--world-size", "3"])
        yield "reshard 2->3, resume on 3 ranks", resume("rs3", ranks=3), c.ckpt("rs3")
    if want("full-queue"):
        # 6000 rows / 256 = 24 batches, 2 prefetched: stopping at 22 leaves the queue full at the end marker
        yield "stop with a full prefetch queue", run(c.train_cmd("fq", "--train.max_steps=22")), c.ckpt("fq")
    if want("bad-id"):
        yield "id beyond its table", run(c.train_cmd("id", "--tables.cardinalities=[50, 200, 7, 100]",
                                                      "--train.max_steps=5")), c.ckpt("id")
    if want("kill-rank"):
        cmd = c.train_cmd("kr", "--train.epochs=50", ranks=2)
        metrics = c.root / "kr" / "logs" / "metrics.jsonl"
        when = lambda p: (children(p.pid) or [None])[-1] if metrics.exists() and metrics.read_text().count("train") > 3 \
            else None
        yield "kill -9 of a rank", killed_during(c, "kr", cmd, when), c.ckpt("kr")
    if want("kill-save"):
        cmd = c.train_cmd("ks", "--train.epochs=50", "--checkpoint.every_steps=2", ranks=2)
        when = lambda p: (children(p.pid) or [None])[-1] \
            if any(c.ckpt("ks").glob(".tmp-step_*")) and list(c.ckpt("ks").glob("step_*")) else None
        yield "kill -9 of a rank during a save", killed_during(c, "ks", cmd, when), c.ckpt("ks")
    for role in ("worker", "server"):
        if want(f"ps-{role}"):
            cmd = [sys.executable, "-m", "distrec", "ps", "--workers", "2", "--servers", "1", "--config", str(c.cfg),
                   f"--data.path={c.data}", f"--logging.dir={c.root / ('ps' + role)}", "--train.epochs=200"]
            metrics = c.root / ("ps" + role) / "metrics.jsonl"
            pids: dict = {}

            def when(p, role=role, metrics=metrics, pids=pids):
                if not pids:
                    line = p.stdout.readline()
                    pids.update({k: int(v) for k, v in (x.rsplit(" pid ", 1) for x in
                                 line.split(": ", 1)[1].strip().split(", "))})
                started = metrics.exists() and metrics.read_text().count('"train"') >= 2
                return pids.get(f"{role} 0" if role == "server" else f"{role} 1") if started else None
            yield f"PS {role} killed", killed_during(c, "ps", cmd, when), c.root / "none"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", help="comma-separated case keys (default: all)")
    args = p.parse_args()
    selected = set(args.cases.split(",")) if args.cases else None
    with tempfile.TemporaryDirectory() as d:
        c = Case(Path(d))
        c.cfg.write_text(SMALL_TOML)
        synthesize(load_config(str(c.cfg)), c.data)
        print("| case | exit code | seconds to exit | first error line | latest checkpoint loads |")
        print("|---|---|---|---|---|")
        for name, (code, seconds, text), ckpt in case_rows(c, selected):
            print(f"| {name} | {code} | {seconds:.1f} | {first_error(text).replace('|', '/') or '-'} | {loads(ckpt)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
