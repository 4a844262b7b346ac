"""Sharded training checkpoints: every rank writes its own shards, the step is committed atomically.

    save_sharded("runs/ckpt", step=500, common=dense_state, own=my_shards, ctx=ctx, keep=2)  # all ranks
    ckpt = open_latest("runs/ckpt")                  # None when there is none
    ckpt.common["position"]                          # rank 0's part: dense model, optimizer, position
    ckpt.pieces(wanted=[("C1", (0, 500), (0, 16))])  # only the rank files holding those rows are read

A checkpoint is a folder ``step_<N>/``: ``common.pt`` (dense model and optimizer, position, config),
``rank_<r>.pt`` (rank r's embedding shards with their global rows and columns, optimizer state
included, and its RNG state) and ``index.json`` (which table rows and columns each rank file holds, so
a rank resuming under another plan reads only the files it needs). Ranks write into ``.tmp-step_<N>/``;
once all have, rank 0 renames it into place and then rewrites ``latest``. A crash during a save leaves
the previous checkpoint and ``latest`` untouched. With several nodes the folder must be shared storage.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from distrec.trainer.dist import all_gather_object, barrier

LATEST = "latest"
COMMON, INDEX = "common.pt", "index.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def _rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a step folder exists only once it is complete)."""
    d = Path(ckpt_dir)
    found = [(int(m.group(1)), p) for p in d.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _staging(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f".tmp-step_{step}"


def _start(ckpt_dir: Path, step: int) -> Path:
    staging = _staging(ckpt_dir, step)
    shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    staging.mkdir(parents=True)
    return staging


def _write_own(staging: Path, rank: int, own: dict) -> None:
    _atomic_write(staging / _rank_file(rank), lambda f: torch.save(own, f))


def _commit(ckpt_dir: Path, step: int, common: dict, owns_index: list[list], keep: int) -> Path:
    staging = _staging(ckpt_dir, step)
    _atomic_write(staging / COMMON, lambda f: torch.save(common, f))
    _atomic_write(staging / INDEX, lambda f: f.write(json.dumps({"ranks": owns_index}).encode()))
    final = ckpt_dir / f"step_{step}"
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (e.g. a rerun without resume)
    os.replace(staging, final)
    _atomic_write(ckpt_dir / LATEST, lambda f: f.write(final.name.encode()))
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def index_of(own: dict) -> list:
    """What a rank file holds: [table, [row_start, row_end], [col_start, col_end]] per piece."""
    return [[p["table"], list(p["rows"]), list(p["cols"])] for p in own.get("shards", [])]


def save_checkpoint(ckpt_dir: str | Path, step: int, common: dict, owns: list[dict], keep: int = 2) -> Path:
    """Every rank's part written by one process (tests, ``distrec reshard``)."""
    d = Path(ckpt_dir)
    staging = _start(d, step)
    try:
        for rank, own in enumerate(owns):
            _write_own(staging, rank, own)
        return _commit(d, step, common, [index_of(o) for o in owns], keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_sharded(ckpt_dir: str | Path, step: int, common: dict | None, own: dict, ctx, keep: int = 2) -> None:
    """Collective (``ctx``: a DistContext): every rank writes ``own``; rank 0 also ``common``, and commits
    once all have written."""
    d = Path(ckpt_dir)
    if ctx.rank == 0:
        _start(d, step)
    barrier(ctx)
    _write_own(_staging(d, step), ctx.rank, own)
    index = all_gather_object(index_of(own), ctx)  # also waits until every rank has written its file
    if ctx.rank == 0:
        _commit(d, step, common, index, keep)
    barrier(ctx)


def _overlaps(a: list, b: tuple) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@dataclass
class Checkpoint:
    path: Path
    common: dict
    index: list[list]  # per rank file: its pieces as index_of gives them

    @property
    def world_size(self) -> int:
        return len(self.index)

    def rank_state(self, rank: int) -> dict:
        return torch.load(self.path / _rank_file(rank), map_location="cpu", weights_only=False, mmap=True)

    def pieces(self, wanted: list[tuple[str, tuple[int, int], tuple[int, int]]] | None = None) -> list[dict]:
        """Saved pieces, read only from the rank files that overlap ``wanted`` (table, rows, cols); all if None."""
        out = []
        for rank, held in enumerate(self.index):
            if wanted is None or any(t == w[0] and _overlaps(r, w[1]) and _overlaps(c, w[2])
                                     for t, r, c in held for w in wanted):
                out += self.rank_state(rank)["shards"]
        return out

    def full_state(self) -> dict:
        """Everything in one dict: ``common`` plus "shards" (all pieces) and "rng" (per saved rank)."""
        owns = [self.rank_state(r) for r in range(self.world_size)]
        return {**self.common, "shards": [p for o in owns for p in o["shards"]], "rng": [o.get("rng") for o in owns]}


def open_checkpoint(path: Path) -> Checkpoint:
    common = torch.load(path / COMMON, map_location="cpu", weights_only=False)
    return Checkpoint(path, common, json.loads((path / INDEX).read_text())["ranks"])


def open_latest(ckpt_dir: str | Path) -> Checkpoint | None:
    d = Path(ckpt_dir)
    pointer = d / LATEST
    path = d / pointer.read_text().strip() if pointer.is_file() else None
    if path is None or not path.is_dir():
        found = list_checkpoints(d)
        path = found[-1] if found else None
    return open_checkpoint(path) if path is not None else None


def load_latest(ckpt_dir: str | Path) -> dict | None:
    """The newest checkpoint as one dict (see ``Checkpoint.full_state``), or None."""
    ckpt = open_latest(ckpt_dir)
    return ckpt.full_state() if ckpt is not None else None
