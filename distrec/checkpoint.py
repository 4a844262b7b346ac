"""Whole-training-state checkpoints, written atomically.

    save_checkpoint("runs/ckpt", step=500, state={...}, keep=2)
    state = load_latest("runs/ckpt")      # None when there is none

A checkpoint is one file ``step_<N>.pt`` written to a temporary name and renamed into place, then
``latest`` is rewritten the same way: a crash during a save leaves the previous checkpoint and the
previous ``latest`` untouched.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(ckpt_dir)
    found = [(int(m.group(1)), p) for p in d.glob("step_*.pt") if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step_{step}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(d / LATEST, lambda f: f.write(path.name.encode()))
    for old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_latest(ckpt_dir: str | Path) -> dict | None:
    d = Path(ckpt_dir)
    pointer = d / LATEST
    path = d / pointer.read_text().strip() if pointer.is_file() else None
    if path is None or not path.is_file():
        found = list_checkpoints(d)
        path = found[-1] if found else None
    if path is None:
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
