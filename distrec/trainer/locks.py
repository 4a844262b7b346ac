"""One run per directory: an exclusive lock on the logging and checkpoint folders for the life of a run.

    locks = lock_run_dirs(["runs/demo/logs", "runs/demo/ckpt"], ctx)   # collective; RunLockError if taken
    ...
    release(locks)

Rank 0 takes ``flock`` on ``DIR/.distrec.lock`` and writes its pid and host there. The kernel drops the
lock when the process ends, however it ends, so a lock file left by a dead run never blocks the next.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from distrec.trainer.dist import all_gather_object

LOCK_FILE = ".distrec.lock"


class RunLockError(RuntimeError):
    """Another live run holds a folder this run needs."""


def _lock(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLockError(f"{folder} is in use by another run ({holder}); give this run another folder "
                           "or wait for that one to end") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def lock_run_dirs(folders: list[str], ctx) -> list:
    """Collective: rank 0 locks every folder; if one is taken, every rank raises the same RunLockError."""
    held, error = [], None
    if ctx.rank == 0:
        for folder in dict.fromkeys(Path(f).resolve() for f in folders if f):
            try:
                held.append(_lock(folder))
            except RunLockError as e:
                error = str(e)
            except OSError as e:
                error = f"{folder}: cannot take the run lock there: {e.strerror or e}"
            if error:
                release(held)
                held = []
                break
    error = all_gather_object(error, ctx)[0]
    if error:
        raise RunLockError(error)
    return held


def release(held: list) -> None:
    for f in held:
        f.close()  # closing the descriptor drops its flock
