"""Files that are either whole or absent: atomic writes, and versioned JSON read back with one-line errors.

    atomic_write(Path("plan.json"), json.dumps(doc))            # str, bytes, or a function of the open file
    atomic_write(path, lambda f: torch.save(state, f))
    doc = read_versioned_json(Path("plan.json"), "format_version", 1, PlanError, "plan")

A reader never sees half a file: the data goes to a temporary file in the same folder, is flushed to
disk, then renamed over the target (``os.replace`` is atomic on POSIX filesystems). A crash leaves the
previous file or none, and no temporary file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: Path | str, data: str | bytes | Callable[[IO[bytes]], Any]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask as open() would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_versioned_json(path: Path | str, key: str, version: int, error: type[Exception], what: str) -> dict:
    """The JSON object in ``path`` whose ``key`` is ``version``; else ``error`` naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable {what} file ({e})") from None
    if not isinstance(doc, dict) or doc.get(key) != version:
        found = doc.get(key) if isinstance(doc, dict) else None
        raise error(f"{path}: {what} {key} {found!r}, this code reads {version}")
    return doc
