"""Asynchronous PS training with real processes: it learns, staleness is measured, a dead worker
stops the run with a clear error, and servers restore their state from a checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from distrec.tools.ps.rows import Partition
from tests.conftest import REPO, run_cli


def records(log_dir, kind):
    return [r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def ps_args(small_data, tmp_path, *more):
    cfg_path, data = small_data
    return ["-m", "distrec", "ps", "--workers", "2", "--servers", "1", "--config", str(cfg_path),
            f"--data.path={data}", f"--logging.dir={tmp_path / 'logs'}", *more]


def test_partitions_cover_every_row_once():
    for kind in ("hash", "range"):
        part = Partition(kind, 3)
        ids = torch.arange(10)
        owner, local = part.owner(ids, 10), part.local(ids, 10)
        assert sum(part.local_rows(10, s) for s in range(3)) == 10
        for s in range(3):
            assert sorted(local[owner == s].tolist()) == list(range(part.local_rows(10, s)))


def test_ps_trains_and_measures_staleness(small_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    r = run_cli(*ps_args(small_data, tmp_path, "--train.epochs=2", "--train.log_every_steps=8",
                         f"--checkpoint.dir={ckpt}"), timeout=120)
    assert r.returncode == 0, r.stderr
    final = r.stdout.strip().splitlines()[-1]
    assert final.startswith("final: step 96 | auc ") and "staleness mean" in final
    train = records(tmp_path / "logs", "train")
    assert train[-1]["samples"] == 2 * 6000  # two epochs of the sync trainer's samples, over 2 workers
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in train)
    stale = [r["staleness_mean"] for r in train]
    assert max(stale) > 0 and all(r["staleness_p99"] >= r["staleness_mean"] >= 0 for r in train)
    ev = records(tmp_path / "logs", "eval")[-1]
    assert ev["rows"] == 2000 and ev["auc"] > 0.65 and ev["step"] == 96
    assert (ckpt / "latest").read_text() == "step_96" and (ckpt / "step_96" / "server_0.pt").is_file()
    # Resume: the servers come back with the trained state (AUC stays, versions continue).
    r = run_cli(*ps_args(small_data, tmp_path / "resumed", "--train.max_steps=1", f"--checkpoint.dir={ckpt}",
                         "--checkpoint.resume=true"), timeout=120)
    assert r.returncode == 0, r.stderr
    ev2 = records(tmp_path / "resumed" / "logs", "eval")[-1]
    assert ev2["step"] == 98 and ev2["auc"] > 0.65


@pytest.mark.parametrize("victim", ["worker 1", "server 0"])
def test_a_killed_process_stops_the_run_with_one_line_naming_it(small_data, tmp_path, victim):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_CPP_LOG_LEVEL", None)  # what `distrec ps` sets for itself is under test
    proc = subprocess.Popen([sys.executable, *ps_args(small_data, tmp_path, "--train.epochs=200")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    pid = int(re.search(rf"{victim} pid (\d+)", line).group(1))
    deadline = time.monotonic() + 60
    metrics = tmp_path / "logs" / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count('"train"') >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60
    # One line and nothing else: no RPC warning of the coordinator's, no traceback, not said twice. The
    # other processes' RPC warnings about the lost peer are kept in LOGDIR/<name>.stderr.
    assert [x for x in err.splitlines() if x.strip()] == [f"distrec ps: error: {victim} (pid {pid}) died "
                                                          "(exit code -9); stopping"], err


def _listening(pgid: int) -> set[str]:
    """Local addresses of the TCP sockets in LISTEN state owned by processes of group ``pgid``."""
    inodes = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:  # a process or descriptor that went away meanwhile
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.add(cols[1].rsplit(":", 1)[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


def test_the_one_machine_ps_listens_on_loopback_only(small_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *ps_args(small_data, tmp_path, "--train.epochs=200")], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        metrics, deadline = tmp_path / "logs" / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        addresses = _listening(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert addresses and addresses <= LOOPBACK, addresses
