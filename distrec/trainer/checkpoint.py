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

``best.json`` (``checkpoint.keep_best``) names the best step by a metric, with its value; that step is
never removed by the rolling ``keep``. It is written atomically after its step is committed, so it
always names a complete checkpoint; the step it named before is removed only after it is rewritten.

``index.json`` also records every file's size and SHA-256, so a resume verifies a step before using it
and falls back to the newest step that verifies (``find_resumable``). Files hold only tensors and plain
data and are read with ``torch.load(weights_only=True)``: a file carrying anything else (a pickled
callable) is refused, and nothing in it runs.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from distrec.trainer.dist import all_gather_object
from sharding.files import atomic_write, read_versioned_json

LATEST = "latest"
BEST = "best.json"
BEST_VERSION = 1
COMMON, INDEX = "common.pt", "index.json"
FORMAT_VERSION = 2  # 2: index.json records each file's size and SHA-256
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read or used: one line naming the file and what is wrong."""


def _rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def _serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> dict:
    """Write ``data`` atomically; its size and SHA-256 for the index. OSError becomes one line."""
    try:
        atomic_write(path, data)
    except OSError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        raise CheckpointError(f"cannot write checkpoint file {path}: {name} ({e.strerror})") from None
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first (a step folder exists only once it is complete)."""
    d = Path(ckpt_dir)
    found = [(int(m.group(1)), p) for p in d.glob("step_*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def check_writable(ckpt_dir: str | Path) -> None:
    """Create the folder and write a probe file in it, so that an unusable folder fails before step 1."""
    d = Path(ckpt_dir)
    probe = d / f".probe-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir {d} is not writable: {e.strerror or e}") from None


def _staging(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f".tmp-step_{step}"


def _start(ckpt_dir: Path, step: int) -> Path:
    staging = _staging(ckpt_dir, step)
    shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
    try:
        staging.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {staging}: {e.strerror or e}") from None
    return staging


def _write_own(staging: Path, rank: int, own: dict) -> dict:
    return _write(staging / _rank_file(rank), _serialized(own))


def _commit(ckpt_dir: Path, step: int, common: dict, owns_index: list[list], files: dict, keep: int) -> Path:
    staging = _staging(ckpt_dir, step)
    files = {**files, COMMON: _write(staging / COMMON, _serialized(common))}
    doc = {"format_version": FORMAT_VERSION, "ranks": owns_index, "files": files}
    _write(staging / INDEX, json.dumps(doc, indent=1).encode())
    final = ckpt_dir / f"step_{step}"
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (e.g. a rerun without resume)
    os.replace(staging, final)
    _write(ckpt_dir / LATEST, final.name.encode())
    prune(ckpt_dir, keep)
    return final


def prune(ckpt_dir: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` steps (0: keep all), and never the step best.json names."""
    best = read_best(ckpt_dir)
    protected = Path(ckpt_dir) / f"step_{best['step']}" if best else None
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)


def read_best(ckpt_dir: str | Path) -> dict | None:
    """best.json: {"step", "metric", "value"} of the best checkpoint, or None when there is none."""
    path = Path(ckpt_dir) / BEST
    if not path.is_file():
        return None
    return read_versioned_json(path, "format_version", BEST_VERSION, CheckpointError, "best checkpoint record")


def write_best(ckpt_dir: str | Path, step: int, metric: str, value: float, keep: int) -> None:
    """Name ``step`` (already committed) the best, then remove the step named before if ``keep`` lets it go."""
    doc = {"format_version": BEST_VERSION, "step": step, "metric": metric, "value": value}
    _write(Path(ckpt_dir) / BEST, json.dumps(doc).encode())
    prune(ckpt_dir, keep)


def forget_best(ckpt_dir: str | Path) -> None:
    """A run that starts afresh in a folder: an earlier run's best.json no longer names this run's best."""
    (Path(ckpt_dir) / BEST).unlink(missing_ok=True)


def index_of(own: dict) -> list:
    """What a rank file holds: [table, [row_start, row_end], [col_start, col_end]] per piece."""
    return [[p["table"], list(p["rows"]), list(p["cols"])] for p in own.get("shards", [])]


def save_checkpoint(ckpt_dir: str | Path, step: int, common: dict, owns: list[dict], keep: int = 2) -> Path:
    """Every rank's part written by one process (tests, ``distrec reshard``)."""
    d = Path(ckpt_dir)
    staging = _start(d, step)
    try:
        files = {_rank_file(rank): _write_own(staging, rank, own) for rank, own in enumerate(owns)}
        return _commit(d, step, common, [index_of(o) for o in owns], files, keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _attempt(fn, *args) -> tuple[object, str | None]:
    try:
        return fn(*args), None
    except CheckpointError as e:
        return None, str(e)


def agreed(ctx, fn, *args):
    """``fn(*args)`` on every rank; a CheckpointError on any rank is raised on all of them (none is
    left waiting in the collectives that follow)."""
    value, error = _attempt(fn, *args)
    first = next((e for e in all_gather_object(error, ctx) if e), None)
    if first:
        raise CheckpointError(first)
    return value


def save_sharded(ckpt_dir: str | Path, step: int, common: dict | None, own: dict, ctx, keep: int = 2) -> None:
    """Collective (``ctx``: a DistContext): every rank writes ``own``; rank 0 also ``common``, and commits
    once all have written. A failure on any rank (disk full) raises the same one-line CheckpointError
    on every rank, the staging folder is removed and the previous checkpoint stays the latest."""
    d = Path(ckpt_dir)
    error = _attempt(_start, d, step)[1] if ctx.rank == 0 else None
    error = all_gather_object(error, ctx)[0]
    if error is None:
        digest, mine = _attempt(_write_own, _staging(d, step), ctx.rank, own)
        gathered = all_gather_object((index_of(own), digest, mine), ctx)  # also: every rank has written
        error = next((g[2] for g in gathered if g[2]), None)
        if error is None:
            if ctx.rank == 0:
                files = {_rank_file(r): g[1] for r, g in enumerate(gathered)}
                error = _attempt(_commit, d, step, common, [g[0] for g in gathered], files, keep)[1]
            error = all_gather_object(error, ctx)[0]
    if error:
        if ctx.rank == 0:
            shutil.rmtree(_staging(d, step), ignore_errors=True)
        raise CheckpointError(error)


def _overlaps(a: list, b: tuple) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def load_tensors(path: Path, mmap: bool = False):
    """``torch.load`` of tensors and plain data only; anything else is refused, naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data ({why[:200]})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).strip().splitlines()[0][:200]})") from None


@dataclass
class Checkpoint:
    path: Path
    common: dict
    index: list[list]  # per rank file: its pieces as index_of gives them

    @property
    def world_size(self) -> int:
        return len(self.index)

    def rank_state(self, rank: int) -> dict:
        return load_tensors(self.path / _rank_file(rank), mmap=True)

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


def _read_index(path: Path) -> dict:
    index = path / INDEX
    if not index.is_file():
        raise CheckpointError(f"{index}: missing (an incomplete or damaged checkpoint)")
    return read_versioned_json(index, "format_version", FORMAT_VERSION, CheckpointError, "checkpoint index")


def verify(path: Path) -> None:
    """Every file the index names is there with its recorded size and SHA-256; else CheckpointError."""
    for name, want in _read_index(path)["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the index recorded {want['size']} (truncated?)")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != want["sha256"]:
            raise CheckpointError(f"{f}: contents differ from the checksum the index recorded (damaged)")


def open_checkpoint(path: Path, verified: bool = False) -> Checkpoint:
    if not verified:
        verify(path)
    return Checkpoint(path, load_tensors(path / COMMON), _read_index(path)["ranks"])


def _newest_first(d: Path) -> list[Path]:
    found = list_checkpoints(d)[::-1]
    pointer = d / LATEST
    named = d / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and named in found:  # ``latest`` first; it is the newest unless a commit was cut short
        found.remove(named)
        found.insert(0, named)
    return found


def find_resumable(ckpt_dir: str | Path, warn=print) -> Path | None:
    """The newest step that verifies; each one passed over is reported through ``warn``."""
    for path in _newest_first(Path(ckpt_dir)):
        try:
            verify(path)
            load_tensors(path / COMMON)  # refused if it carries code, before any rank relies on it
            return path
        except CheckpointError as e:
            warn(f"checkpoint {path.name} passed over: {e}")
    return None


def open_latest(ckpt_dir: str | Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None when there is none."""
    path = find_resumable(ckpt_dir, warn)
    return open_checkpoint(path, verified=True) if path is not None else None


def open_for_resume(ckpt_dir: str | Path, ctx, warn) -> Checkpoint | None:
    """Collective: rank 0 picks the newest step that verifies (telling ``warn`` of each one passed
    over), and every rank opens that one, so all ranks resume from the same step or none."""
    chosen = None
    if ctx.rank == 0:
        path = find_resumable(ckpt_dir, warn)
        chosen = path.name if path is not None else None
    chosen = all_gather_object(chosen, ctx)[0]
    return open_checkpoint(Path(ckpt_dir) / chosen, verified=True) if chosen else None


def load_latest(ckpt_dir: str | Path) -> dict | None:
    """The newest checkpoint as one dict (see ``Checkpoint.full_state``), or None."""
    ckpt = open_latest(ckpt_dir)
    return ckpt.full_state() if ckpt is not None else None
