"""Reading the input files (plain or gzip TSV) in chunks of whole lines, and each file's accounting.

    src = Source(Path("day_0.gz"), split=None)
    for first_line, data, read_so_far in read_chunks(src, chunk_lines=200_000):
        ...                 # data: whole lines, first_line: the 1-based number of the first one
    src.record()            # {"name": "day_0.gz", "sha256": ..., "lines": ..., "rows": ..., ...}

Each file is read from disk once: the checksum is taken as the bytes go by.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from distrec.data.manifest import DataError
from distrec.tools.data.splits import SPLITS
from distrec.tools.data.tsv_parse import FIRST_LINES, NL

READ_BLOCK = 1 << 22  # bytes per read: 4 MiB
_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


@dataclass
class Source:
    path: Path
    split: str | None  # --split file: where all its lines go; --split hash: None
    lines: int = 0
    bytes: int = 0
    sha256: str = ""
    rows: dict = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict = field(default_factory=dict)  # reason key -> {"count", "first_lines"}

    def add_malformed(self, malformed: dict) -> None:
        for key, (n, lines) in malformed.items():
            rec = self.skipped.setdefault(key, {"count": 0, "first_lines": []})
            rec["count"] += n
            rec["first_lines"] = (rec["first_lines"] + lines)[:FIRST_LINES]

    def record(self) -> dict:
        return {"path": str(self.path), "name": self.path.name, "sha256": self.sha256, "bytes": self.bytes,
                "lines": self.lines, "rows_written": sum(self.rows.values()), "rows": self.rows,
                "lines_skipped": sum(r["count"] for r in self.skipped.values()),
                "split": self.split or "hash"}


class _HashingReader(io.RawIOBase):
    """Checksums and counts the bytes as they are read, so that each file is read from disk once."""

    def __init__(self, raw):
        self.raw, self.sha, self.nbytes = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        self.sha.update(memoryview(b)[:n])
        self.nbytes += n
        return n


class ReadStopped(Exception):
    """Reading failed (``error``) after ``lines`` whole lines of the chunk being cut."""

    def __init__(self, lines: int, error: Exception):
        super().__init__(lines, error)
        self.lines, self.error = lines, error


def _is_gzip(path: Path) -> bool:
    """By the magic bytes, not the name; other compressions are an error rather than garbage lines."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path}: {name}-compressed; preprocess reads plain or gzip files")
    return head.startswith(b"\x1f\x8b")


def _read_block(stream, block: int, lines: int) -> bytes:
    """Up to block bytes, b"" at the end. Made of read1 calls, each one read of the layer below, so
    that when one fails every byte before it is counted: ReadStopped then says how many whole lines
    were read since the last chunk (``lines`` before this block)."""
    pieces, size = [], 0
    try:
        while size < block and (piece := stream.read1(block - size)):
            pieces.append(piece)
            size += len(piece)
    except (OSError, EOFError, zlib.error) as e:
        raise ReadStopped(lines + sum(p.count(b"\n") for p in pieces), e) from None
    return b"".join(pieces)


def line_chunks(stream, chunk_lines: int, block: int = READ_BLOCK) -> Iterator[tuple[int, bytes]]:
    """(number of lines, bytes) per chunk of chunk_lines whole lines (the last may have fewer), cut from
    big reads of a buffered binary stream (one with read1): a Python object per line would cost about as
    much as parsing it. A failing read raises ReadStopped with the whole lines read since the last chunk."""
    pending, count = [], 0  # the start of the next chunk, and its newlines
    while data := _read_block(stream, block, count):
        newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == NL)
        start, used = 0, 0  # bytes and newlines of this block already handed out
        while count + newlines.size - used >= chunk_lines:
            used += chunk_lines - count
            cut = int(newlines[used - 1]) + 1
            yield chunk_lines, b"".join(pending + [data[start:cut]])
            pending, count, start = [], 0, cut
        pending.append(data[start:])
        count += newlines.size - used
    rest = b"".join(pending)
    if rest:
        yield count + (not rest.endswith(b"\n")), rest


def read_chunks(src: Source, chunk_lines: int) -> Iterator[tuple[int, bytes, int]]:
    """Yield (first line number, whole lines, bytes read from disk so far) per chunk; fill in src's
    size, checksum and line count when done."""
    gz = _is_gzip(src.path)
    with open(src.path, "rb", buffering=0) as f:
        raw = _HashingReader(f)
        stream = io.BufferedReader(raw, READ_BLOCK)
        stream = gzip.GzipFile(fileobj=stream, mode="rb") if gz else stream
        line = 1
        try:
            for n, data in line_chunks(stream, chunk_lines):
                yield line, data, raw.nbytes
                line += n
        except ReadStopped as e:
            last = line - 1 + e.lines
            where = f"past line {last} (the last whole line read)" if last else "line 1"
            raise DataError(f"{src.path}: cannot read {where}: {e.error}") from None
        while raw.read(1 << 20):  # bytes after the end of the gzip stream still count for the checksum
            pass
    src.lines, src.bytes, src.sha256 = line - 1, raw.nbytes, raw.sha.hexdigest()
