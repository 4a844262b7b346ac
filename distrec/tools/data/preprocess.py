"""Real Criteo TSV (plain or gzip) -> Parquet shards per split + ``manifest.json``, streaming, on all cores.

    manifest = preprocess(["day_0.gz", "day_1.gz"], "runs/criteo", min_count=4, workers=8)
    manifest["cardinalities"]["C3"]  # 2 + the values of C3 seen at least 4 times in the training split

Input: one sample per line, ``label I1..I13 C1..C26``, tab separated (40 fields). The label is 0 or 1;
dense fields are integers (optional leading '-'); categorical fields are hex strings (Criteo's are 8
digits, e.g. ``68fd1e64``); any field but the label may be empty. Gzip is detected by its magic bytes.

DLRM convention: dense x -> log(max(x, 0) + 1) as float32, missing -> 0. Categorical values -> ids per
table: 0 missing, 1 rare (seen fewer than ``min_count`` times in the training split) or unseen there,
2.. the frequent values in order of their hex value. The default ``min_count`` 1 keeps every value seen
in training. Values are compared by hex value, so ``00ab`` and ``AB`` are the same value.

Two passes. Pass 1, in worker processes over chunks of ``chunk_lines`` lines: parse, check, split,
transform the dense features, write the chunk as intermediate Arrow files with the raw hex values, and
return value counts of the training rows. The main process reads and decompresses the files (once: it
checksums as it reads), hands out chunks, and merges the counts into the vocabulary, saved as
``DIR/vocab/C1.npy ..`` (the sorted int64 hex values of the frequent values; the value at index i has
id i + 2) so that ``vocab=OLD_DIR`` maps later days to the same ids without counting. Pass 2 maps the
intermediate files to ids and writes the shards ``DIR/<split>/part-NNNNN.parquet`` (consecutive chunks'
rows of a split, at most ``chunk_lines``). Shards depend only on the lines, ``chunk_lines`` and the
vocabulary: not on the number of workers, nor on whether a file was gzipped.

Malformed lines (wrong field count, bad label, non-integer dense, non-hex categorical) are skipped,
counted per file and reason with the first line numbers, printed to stderr and recorded in the
manifest; ``strict=True`` makes the first one an error instead.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.parquet as pq
from tqdm import tqdm

from distrec.config import CRITEO_CATEGORICAL, CRITEO_DENSE
from distrec.data.manifest import DataError, read_manifest, write_manifest

LABEL = "label"
SPLITS = ("train", "valid", "test")  # split codes 0, 1, 2
NUM_FIELDS = 1 + len(CRITEO_DENSE) + len(CRITEO_CATEGORICAL)
DEFAULT_CHUNK_LINES = 200_000  # ~50 MB of Criteo text; a worker peaks near 0.5 GB parsing one
ROW_GROUP_SIZE = 8192  # the loader reads and shuffles whole row groups
FIRST_LINES = 5  # line numbers kept per file and reason
VOCAB_DIR = "vocab"
TMP_DIR = ".preprocess-tmp"
READ_BLOCK = 1 << 22
HEX_EXACT_DIGITS = 15  # up to 15 hex digits the value is the key; longer ones are hashed above 2**60
HASH_SPLIT = ("crc32 of the line's bytes without its line ending, / 2**32: below valid_frac -> valid, "
              "below valid_frac + test_frac -> test, else train")
# Index = reason code: 0 field count, 1 label, 2..14 dense I1..I13, 15..40 categorical C1..C26, the
# order the fields are checked in (a line with several problems is counted once, under the first).
REASONS = (("wrong_field_count", "wrong field count"), ("bad_label", "bad label"),
           *((f"bad_dense_{c}", f"bad dense value in {c}") for c in CRITEO_DENSE),
           *((f"bad_hex_{c}", f"bad hex in {c}") for c in CRITEO_CATEGORICAL))
_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
NL, TAB, MINUS, ZERO, ONE = b"\n"[0], b"\t"[0], b"-"[0], b"0"[0], b"1"[0]


def _hex_table() -> np.ndarray:
    """Byte -> hex digit value, 255 for anything else; read-only."""
    table = np.full(256, 255, np.uint8)
    for digits in (b"0123456789abcdef", b"0123456789ABCDEF"):
        table[list(digits)] = np.arange(16)
    table.setflags(write=False)
    return table


_HEX = _hex_table()
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)


# ---------------------------------------------------------------- parsing one chunk (in a worker)


class _Chunk(NamedTuple):
    file_index: int
    chunk_index: int
    first_line: int  # 1-based line number of the chunk's first line in its file
    data: bytes  # whole lines
    rule: tuple  # ("hash", valid_frac, test_frac) or ("file", split name)
    count: bool  # return value counts of the training rows (the vocabulary is being counted)
    tmp: str  # folder for the intermediate files
    read_to: int  # bytes of all input read from disk up to this chunk, for the progress bar


def _split_fields(a: np.ndarray):
    """Per line its number of fields; which lines have 40; [start, end) of those lines' fields, [n, 40].
    One scan for tabs and newlines together: the fields of a line lie between consecutive ones."""
    seps = np.flatnonzero((a == TAB) | (a == NL))
    line_end = a[seps] == NL
    if a.size and a[-1] != NL:  # the file's last line, without its newline
        seps, line_end = np.append(seps, a.size), np.append(line_end, True)
    starts = np.concatenate(([0], seps[:-1] + 1))[:seps.size]
    nfields = np.diff(np.flatnonzero(line_end), prepend=-1)
    ok = nfields == NUM_FIELDS
    if not ok.all():
        keep = np.repeat(ok, nfields)
        starts, seps = starts[keep], seps[keep]
    return nfields, ok, starts.reshape(-1, NUM_FIELDS), seps.reshape(-1, NUM_FIELDS)


def _by_length(lens: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(length, indices) of the non-empty fields grouped by length: numpy then loops over the few
    lengths and the digits of each, never over fields."""
    for length in np.flatnonzero(np.bincount(lens)[1:]) + 1:
        yield int(length), np.flatnonzero(lens == length)


def _gather(a: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """The bytes of fields of one length, [fields, length]; from a strided view, 2-3x faster than
    indexing with starts[:, None] + arange(length)."""
    return np.lib.stride_tricks.sliding_window_view(a, length)[starts]


def _parse_label(a, fs, fe):
    first = a[np.minimum(fs, a.size - 1)] if a.size else np.zeros(0, np.uint8)
    bad = (fe - fs != 1) | ((first != ZERO) & (first != ONE))
    return (first == ONE).astype(np.float32), bad


def _parse_dense(a, fs, fe):
    """Integer fields -> log(max(x, 0) + 1) as float32 (empty -> 0), and which fields are bad."""
    x, bad = np.zeros(fs.size), np.zeros(fs.size, bool)
    for length, sel in _by_length(fe - fs):
        b = _gather(a, fs[sel], length)
        neg = b[:, 0] == MINUS
        digits = b - np.uint8(ZERO)  # uint8 wraps, so every non-digit byte becomes >= 10
        digits[:, 0][neg] = 0
        bad[sel] = (digits > 9).any(1) | (neg & (length == 1))
        value = np.zeros(sel.size)  # float64: exact below 2**53, no overflow for absurdly long numbers
        for j in range(length):
            value = value * 10 + digits[:, j]
        x[sel] = np.where(neg, 0.0, value)  # DLRM: negative counts -> 0
    return np.log1p(x).astype(np.float32), bad


def _long_hex(s: bytes) -> tuple[int, bool]:
    """(value, bad) of a field longer than HEX_EXACT_DIGITS; hashed above 2**60 if it does not fit."""
    if s.translate(None, b"0123456789abcdefABCDEF"):
        return -1, True
    digits = s.lstrip(b"0").lower()
    if len(digits) <= HEX_EXACT_DIGITS:
        return int(digits or b"0", 16), False
    h = int.from_bytes(hashlib.blake2b(digits, digest_size=8).digest(), "little")
    return 2**60 + h % (2**63 - 2**60), False


def _parse_hex(a, fs, fe):
    """Hex fields -> int64 values (-1: empty), and which fields are bad."""
    v, bad = np.full(fs.size, -1, np.int64), np.zeros(fs.size, bool)
    for length, sel in _by_length(fe - fs):
        if length > HEX_EXACT_DIGITS:  # never in real Criteo data
            for i in sel:
                v[i], bad[i] = _long_hex(a[fs[i]:fe[i]].tobytes())
            continue
        # Right-aligned in 8 or 16 nibbles, the field is one or two uint64 words: valid digits leave
        # every high nibble zero, and packing nibble pairs into bytes gives the value, big-endian.
        width = 8 if length <= 8 else 16
        nibbles = _HEX[_gather(a, fs[sel], length)]
        if length < width:
            nibbles = np.hstack([np.zeros((sel.size, width - length), np.uint8), nibbles])
        bad[sel] = (nibbles.view(np.uint64) & _HIGH_NIBBLES).any(1)
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
        v[sel] = packed.view(f">u{width // 2}")[:, 0]
    return v, bad


def _by_column(parse, a, fs, fe) -> tuple[np.ndarray, np.ndarray]:
    """parse over fields [lines, columns] -> (values, bad), each [columns, lines]. The fields are
    parsed in line-major order, the order of their bytes in memory: column by column would be a
    cache miss per field."""
    values, bad = parse(a, fs.ravel(), fe.ravel())
    shape = (-1, fs.shape[1])
    return values.reshape(shape).T.copy(), bad.reshape(shape).T.copy()


def _reason_codes(ok: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Per line: -1 fine, else the index into REASONS of its first problem. bad: [40 fields, ok lines]."""
    reason = np.full(ok.size, -1, np.int64)
    reason[~ok] = 0
    any_bad = bad.any(0)
    reason[np.flatnonzero(ok)[any_bad]] = 1 + bad[:, any_bad].argmax(0)
    return reason


def _split_codes(data: bytes, n: int, rule: tuple) -> np.ndarray:
    if rule[0] == "file":
        return np.full(n, SPLITS.index(rule[1]), np.int8)
    _, valid_frac, test_frac = rule
    lines = data.split(b"\n")[:n]  # [:n] drops the empty string after a final newline
    u = np.fromiter(map(zlib.crc32, lines), np.uint32, n) / 2.0**32
    return np.where(u < valid_frac, 1, np.where(u < valid_frac + test_frac, 2, 0)).astype(np.int8)


def _malformed(reason: np.ndarray, first_line: int) -> dict:
    """{reason key: (count, first line numbers)} for the chunk's malformed lines."""
    out = {}
    codes, counts = np.unique(reason[reason >= 0], return_counts=True)
    for code, n in zip(codes.tolist(), counts.tolist()):
        out[REASONS[code][0]] = (n, (first_line + np.flatnonzero(reason == code)[:FIRST_LINES]).tolist())
    return out


def _first_bad(data, reason, ok, nfields, fs, fe, first_line):
    """(line number, reason key, detail) of the chunk's first malformed line, for --strict."""
    bad = np.flatnonzero(reason >= 0)
    if not bad.size:
        return None
    i, code = int(bad[0]), int(reason[bad[0]])
    if code == 0:
        detail = f"expected {NUM_FIELDS} tab-separated fields, got {nfields[i]}"
    else:
        row = np.count_nonzero(ok[:i])
        detail = repr(data[fs[row, code - 1]:fe[row, code - 1]].decode(errors="replace")[:40])
    return first_line + i, REASONS[code][0], detail


def _table(label: np.ndarray, dense: np.ndarray, cats: np.ndarray) -> pa.Table:
    cols = {LABEL: label, **dict(zip(CRITEO_DENSE, dense)), **dict(zip(CRITEO_CATEGORICAL, cats))}
    return pa.table(cols)


def _write_parts(job: _Chunk, label, dense, cats, split) -> dict[str, tuple[str, int]]:
    """Intermediate files per split of one chunk: {split: (path, rows)} for the non-empty ones."""
    parts = {}
    for code, name in enumerate(SPLITS):
        m = split == code
        if m.any():
            path = Path(job.tmp) / f"f{job.file_index:05d}-c{job.chunk_index:06d}-{name}.arrow"
            # Arrow IPC with LZ4: written and read back 2x faster than Parquet, at 2x the size
            feather.write_feather(_table(label[m], dense[:, m], cats[:, m]), path, compression="lz4")
            parts[name] = (str(path), int(m.sum()))
    return parts


def _value_counts(cats: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return [np.unique(col[col >= 0], return_counts=True) for col in cats]


def _parse_chunk(job: _Chunk) -> dict:
    """Pass 1 for one chunk: check, split, transform dense, write intermediate files, count values."""
    data = job.data.replace(b"\r\n", b"\n") if b"\r" in job.data else job.data  # CRLF: \r is no part of C26
    a = np.frombuffer(data, np.uint8)
    nfields, ok, fs, fe = _split_fields(a)
    label, bad_label = _parse_label(a, fs[:, 0], fe[:, 0])
    dense, bad_dense = _by_column(_parse_dense, a, fs[:, 1:14], fe[:, 1:14])
    cats, bad_cats = _by_column(_parse_hex, a, fs[:, 14:], fe[:, 14:])
    reason = _reason_codes(ok, np.vstack([bad_label, bad_dense, bad_cats]))
    keep = reason[ok] < 0
    split = _split_codes(data, nfields.size, job.rule)[reason < 0]
    label, dense, cats = label[keep], dense[:, keep], cats[:, keep]
    return {"file_index": job.file_index, "read_to": job.read_to,
            "parts": _write_parts(job, label, dense, cats, split),
            "malformed": _malformed(reason, job.first_line),
            "first_bad": _first_bad(data, reason, ok, nfields, fs, fe, job.first_line),
            "counts": _value_counts(cats[:, split == 0]) if job.count else None}


# ---------------------------------------------------------------- pass 2 for one shard (in a worker)


def map_ids(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Hex values (-1: missing) -> ids: 0 missing, 1 not in the sorted vocabulary, else index + 2."""
    if vocab.size <= values.size:  # a hash table of the vocabulary costs less than binary searches in it
        pos = pc.index_in(values, value_set=pa.array(vocab)).fill_null(-1).to_numpy()
        ids = np.where(pos >= 0, pos + 2, 1)
    else:
        pos = np.searchsorted(vocab, values)
        found = np.zeros(values.shape, bool)
        inside = pos < vocab.size
        found[inside] = vocab[pos[inside]] == values[inside]
        ids = np.where(found, pos + 2, 1)
    ids[values < 0] = 0
    return ids.astype(np.int64)


def _write_shard(job: tuple[list[str], str, str]) -> int:
    """Pass 2 for one shard: join its intermediate parts, map hex values to ids, write, clean up."""
    tmp_paths, final_path, vocab_dir = job
    table = pa.concat_tables([feather.read_table(p) for p in tmp_paths]).combine_chunks()
    for col in CRITEO_CATEGORICAL:
        # mmap: the workers share one copy of the vocabulary through the page cache
        vocab = np.load(Path(vocab_dir) / f"{col}.npy", mmap_mode="r")
        ids = map_ids(table.column(col).to_numpy(), vocab)
        table = table.set_column(table.schema.get_field_index(col), col, pa.array(ids))
    pq.write_table(table, final_path, row_group_size=ROW_GROUP_SIZE)
    for path in tmp_paths:
        os.remove(path)
    return table.num_rows


# ---------------------------------------------------------------- reading the input (main process)


@dataclass
class _Source:
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


def line_chunks(stream, chunk_lines: int, block: int = READ_BLOCK) -> Iterator[tuple[int, bytes]]:
    """(number of lines, bytes) per chunk of chunk_lines whole lines (the last may have fewer), cut from
    big reads: a Python object per line would cost about as much as parsing it."""
    pending, count = [], 0  # the start of the next chunk, and its newlines
    while data := stream.read(block):
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


def _read_chunks(src: _Source, chunk_lines: int) -> Iterator[tuple[int, bytes, int]]:
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
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{src.path}: cannot read line {line} onwards: {e}") from None
        while raw.read(1 << 20):  # bytes after the end of the gzip stream still count for the checksum
            pass
    src.lines, src.bytes, src.sha256 = line - 1, raw.nbytes, raw.sha.hexdigest()


def _chunk_jobs(sources, plan: dict, tmp: Path, chunk_lines: int, count: bool) -> Iterator[_Chunk]:
    done = 0  # bytes of the files before this one
    for fi, src in enumerate(sources):
        rule = ("file", src.split) if src.split else ("hash", plan["valid_frac"], plan["test_frac"])
        for ci, (first, data, read) in enumerate(_read_chunks(src, chunk_lines)):
            yield _Chunk(fi, ci, first, data, rule, count, str(tmp), done + read)
        done += src.bytes


# ---------------------------------------------------------------- the two passes (main process)


@contextlib.contextmanager
def _executor(workers: int) -> Iterator[Executor]:
    if workers == 1:  # same code path and output, without starting processes
        ex = ThreadPoolExecutor(1)
    else:  # spawn: forking a process that runs threads (executor, tqdm, Arrow) can deadlock
        ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _ordered(ex: Executor, fn, jobs: Iterable, window: int) -> Iterator:
    """fn over jobs with at most `window` in flight, results in job order. Executor.map would submit
    every job (every chunk of the input) at once; ordering makes the output independent of timing."""
    pending = deque()
    for job in jobs:
        pending.append(ex.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


class _Counts:
    """Value counts of one column, merged over chunks in batches: memory stays near the number of
    distinct values, not the sum over chunks."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        self.parts.append((values, counts))
        if len(self.parts) >= 32:
            self.parts = [self.result()]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        values = np.concatenate([v for v, _ in self.parts] + [np.zeros(0, np.int64)])
        counts = np.concatenate([c for _, c in self.parts] + [np.zeros(0, np.int64)])
        if not values.size:
            return values, counts
        order = np.argsort(values, kind="stable")  # timsort: fast on concatenated sorted runs
        values, counts = values[order], counts[order]
        starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
        return values[starts], np.add.reduceat(counts, starts)


def _pass1(ex, sources, plan, tmp, opts, progress) -> tuple[list[dict], list[_Counts] | None]:
    """Parse every chunk; returns the intermediate parts per chunk and the value counts (None when
    the vocabulary is given)."""
    counters = [_Counts() for _ in CRITEO_CATEGORICAL] if opts["vocab"] is None else None
    parts = []
    total = sum(src.path.stat().st_size for src in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="parse", disable=not progress, file=sys.stderr)
    with bar:
        jobs = _chunk_jobs(sources, plan, tmp, opts["chunk_lines"], counters is not None)
        for res in _ordered(ex, _parse_chunk, jobs, 2 * opts["workers"]):
            bar.update(res["read_to"] - bar.n)  # as chunks are done, not as they are read ahead
            _take_chunk(sources[res["file_index"]], res, opts["strict"])
            parts.append(res["parts"])
            for counter, (values, counts) in zip(counters or (), res["counts"] or ()):
                counter.add(values, counts)
        bar.update(total - bar.n)
    return parts, counters


def _take_chunk(src: _Source, res: dict, strict: bool) -> None:
    if strict and res["first_bad"]:
        line, key, detail = res["first_bad"]
        raise DataError(f"{src.path} line {line}: {dict(REASONS)[key]}: {detail} (--strict)")
    src.add_malformed(res["malformed"])
    for name, (_, n) in res["parts"].items():
        src.rows[name] += n


def _shards(parts: list[dict], max_rows: int) -> list[tuple[str, list[str]]]:
    """(split, intermediate files) per shard, in input order. Consecutive parts of a split are joined
    while they fit in max_rows: valid and test get a sliver of every chunk, which alone would make
    many small shards. Depends only on the input and chunk_lines, never on timing."""
    pending, rows, shards = {name: [] for name in SPLITS}, dict.fromkeys(SPLITS, 0), []
    for chunk in parts:
        for name, (path, n) in chunk.items():
            if pending[name] and rows[name] + n > max_rows:
                shards.append((name, pending[name]))
                pending[name], rows[name] = [], 0
            pending[name].append(path)
            rows[name] += n
    return shards + [(name, pending[name]) for name in SPLITS if pending[name]]


def _pass2(ex, out: Path, parts: list[dict], opts: dict, progress: bool) -> dict:
    """Map the intermediate parts to ids and write the shards, numbered per split in input order."""
    splits = {name: {"rows": 0, "files": []} for name in SPLITS}
    jobs = []
    for name, paths in _shards(parts, opts["chunk_lines"]):
        rel = f"{name}/part-{len(splits[name]['files']):05d}.parquet"
        splits[name]["files"].append(rel)
        jobs.append((paths, str(out / rel), str(out / VOCAB_DIR)))
    for name in SPLITS:
        (out / name).mkdir()
    bar = tqdm(total=len(jobs), unit="shard", desc="write", disable=not progress, file=sys.stderr)
    with bar:
        for job, rows in zip(jobs, _ordered(ex, _write_shard, jobs, 2 * opts["workers"])):
            splits[Path(job[1]).parent.name]["rows"] += rows
            bar.update()
    return splits


# ---------------------------------------------------------------- vocabulary


def _build_vocab(counters: list[_Counts], min_count: int) -> dict[str, np.ndarray]:
    vocab = {}
    for col, counter in zip(CRITEO_CATEGORICAL, counters):
        values, counts = counter.result()
        vocab[col] = values[counts >= min_count]
    return vocab


def load_vocab(data_dir: str | Path) -> dict[str, np.ndarray]:
    """The vocabulary of a preprocessed data set: per table, the sorted hex values with ids 2, 3, .."""
    vocab = {}
    for col in CRITEO_CATEGORICAL:
        path = Path(data_dir) / VOCAB_DIR / f"{col}.npy"
        try:
            v = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the vocabulary: {e}") from None
        if v.dtype != np.int64 or v.ndim != 1 or np.any(v[1:] <= v[:-1]):
            raise DataError(f"{path}: not a vocabulary (a sorted 1-D int64 array of distinct values)")
        vocab[col] = v
    return vocab


def _save_vocab(out: Path, vocab: dict[str, np.ndarray]) -> None:
    (out / VOCAB_DIR).mkdir()
    for col, values in vocab.items():
        np.save(out / VOCAB_DIR / f"{col}.npy", values)


def _vocab_source(vocab: str | Path | None, min_count: int | None) -> tuple[Path | None, int]:
    """(folder of the vocabulary to reuse or None, the min_count it was or will be counted with)."""
    if vocab is None:
        min_count = 1 if min_count is None else int(min_count)
        if min_count < 1:
            raise DataError(f"--min-count must be at least 1, not {min_count}")
        return None, min_count
    old = read_manifest(vocab)
    if old.get("kind") != "criteo":
        raise DataError(f"{vocab}: --vocab needs a data set made by `distrec data preprocess`, this one is "
                        f"kind {old.get('kind')!r}")
    if min_count is not None and min_count != old["min_count"]:
        raise DataError(f"--min-count {min_count} conflicts with --vocab {vocab}, whose vocabulary was "
                        f"counted with min_count {old['min_count']}")
    return Path(vocab), old["min_count"]


# ---------------------------------------------------------------- options and checks


def _check_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    paths = [Path(p) for p in inputs]
    if not paths:
        raise DataError("no input files (--in FILE ...)")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: {'not a file' if p.exists() else 'no such input file'}")
    names = [p.name for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # files are named by name in the manifest and in --valid-files/--test-files
        raise DataError(f"input file names must be distinct; given more than once: {', '.join(twice)}")
    return paths


def _named(names: list[str], given: Iterable[str], flag: str) -> list[str]:
    wanted = [Path(g).name for g in given]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise DataError(f"{flag} names files that are not inputs: {', '.join(unknown)} "
                        f"(inputs: {', '.join(names)})")
    return sorted(set(wanted))


def _split_plan(names, split, valid_frac, test_frac, valid_files, test_files) -> dict:
    """The manifest's "split" record, after checking the options fit together."""
    if split == "hash":
        if valid_files or test_files:
            raise DataError("--valid-files/--test-files need --split file")
        vf = 0.05 if valid_frac is None else float(valid_frac)
        tf = 0.05 if test_frac is None else float(test_frac)
        if not (vf >= 0 and tf >= 0 and vf + tf < 1):
            raise DataError(f"--valid-frac {vf} and --test-frac {tf} must be >= 0 and sum to less than 1")
        return {"method": "hash", "valid_frac": vf, "test_frac": tf, "hash": HASH_SPLIT}
    if split == "file":
        if valid_frac is not None or test_frac is not None:
            raise DataError("--valid-frac/--test-frac are for --split hash; --split file takes "
                            "--valid-files/--test-files")
        valid = _named(names, valid_files, "--valid-files")
        test = _named(names, test_files, "--test-files")
        both = sorted(set(valid) & set(test))
        if both:
            raise DataError(f"in both --valid-files and --test-files: {', '.join(both)}")
        return {"method": "file", "valid_files": valid, "test_files": test}
    raise DataError(f"--split must be 'hash' or 'file', not {split!r}")


def _file_split(plan: dict, name: str) -> str | None:
    if plan["method"] == "hash":
        return None
    return "valid" if name in plan["valid_files"] else "test" if name in plan["test_files"] else "train"


def _prepare_out(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an empty folder; preprocess writes a new data set "
                        f"(pick another --out, or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _positive(value, flag: str) -> int:
    if int(value) < 1:
        raise DataError(f"{flag} must be at least 1, not {value}")
    return int(value)


# ---------------------------------------------------------------- report and manifest


def _lines_text(rec: dict) -> str:
    more = ", ..." if rec["count"] > len(rec["first_lines"]) else ""
    return f"line{'s' if rec['count'] > 1 else ''} {', '.join(map(str, rec['first_lines']))}{more}"


def malformed_report(source: dict, skipped: dict) -> str | None:
    """One readable line for a file with malformed lines, e.g.
    ``day_0.gz: 3 malformed lines skipped: 2 wrong field count (lines 7, 19), 1 bad hex in C4 (line 12)``."""
    n = sum(rec["count"] for rec in skipped.values())
    if not n:
        return None
    parts = [f"{skipped[key]['count']} {text} ({_lines_text(skipped[key])})" for key, text in REASONS
             if key in skipped]
    return f"{source['name']}: {n} malformed line{'s' if n > 1 else ''} skipped: {', '.join(parts)}"


def _summary(manifest: dict, seconds: float) -> str:
    rows = sum(s["rows"] for s in manifest["splits"].values())
    lines = sum(s["lines"] for s in manifest["source_files"])
    per_split = ", ".join(f"{manifest['splits'][name]['rows']:,} {name}" for name in SPLITS)
    return (f"preprocess: {lines:,} lines -> {per_split} rows ({manifest['skipped_total']:,} malformed "
            f"lines skipped) in {seconds:.1f} s: {rows / max(seconds, 1e-9):,.0f} rows/s")


def _manifest(sources, splits, vocab, plan, min_count, vocab_from, chunk_lines) -> dict:
    return {
        "kind": "criteo",
        "schema": {"label": LABEL, "dense": list(CRITEO_DENSE), "categorical": list(CRITEO_CATEGORICAL)},
        "cardinalities": {col: 2 + int(v.size) for col, v in vocab.items()},
        "splits": splits,
        "source_files": [src.record() for src in sources],
        "min_count": min_count,
        "vocab": {"dir": VOCAB_DIR, "from": None if vocab_from is None else str(vocab_from),
                  "ids": "0 missing, 1 rare (seen fewer than min_count times in the training split) or "
                         "unseen there, 2.. the frequent values in order of hex value (vocab/C*.npy)"},
        "dense_transform": "log(max(x, 0) + 1) as float32; missing -> 0",
        "split": plan,
        "skipped": {src.path.name: src.skipped for src in sources},
        "skipped_total": sum(rec["count"] for src in sources for rec in src.skipped.values()),
        "chunk_lines": chunk_lines,
        "row_group_size": ROW_GROUP_SIZE,
    }


# ---------------------------------------------------------------- entry points


def preprocess(inputs: Iterable[str | Path], out_dir: str | Path, *, min_count: int | None = None,
               split: str = "hash", valid_frac: float | None = None, test_frac: float | None = None,
               valid_files: Iterable[str] = (), test_files: Iterable[str] = (),
               vocab: str | Path | None = None, strict: bool = False, workers: int | None = None,
               chunk_lines: int = DEFAULT_CHUNK_LINES, progress: bool = True) -> dict:
    """Preprocess Criteo files into ``out_dir``; returns the manifest. min_count None: 1, or with
    ``vocab`` (an earlier output folder) that vocabulary's; fracs None: 0.05 each (``split="hash"``).
    workers None: all cores. Workers > 1 are spawned processes, so a calling script needs the
    ``if __name__ == "__main__":`` guard."""
    start = time.perf_counter()
    paths = _check_inputs(inputs)
    plan = _split_plan([p.name for p in paths], split, valid_frac, test_frac, valid_files, test_files)
    vocab_from, min_count = _vocab_source(vocab, min_count)
    opts = {"vocab": vocab_from, "strict": strict, "chunk_lines": _positive(chunk_lines, "--chunk-lines"),
            "workers": _positive((os.cpu_count() or 1) if workers is None else workers, "--workers")}
    sources = [_Source(p, _file_split(plan, p.name)) for p in paths]
    table_vocab = None if vocab_from is None else load_vocab(vocab_from)
    out = _prepare_out(out_dir)
    (out / TMP_DIR).mkdir()
    try:
        with _executor(opts["workers"]) as ex:
            parts, counters = _pass1(ex, sources, plan, out / TMP_DIR, opts, progress)
            if table_vocab is None:
                table_vocab = _vocab_from_counts(sources, counters, min_count)
            _save_vocab(out, table_vocab)
            splits = _pass2(ex, out, parts, opts, progress)
    finally:
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    manifest = _manifest(sources, splits, table_vocab, plan, min_count, vocab_from, opts["chunk_lines"])
    write_manifest(out, manifest)  # last: a reader never sees a half-written data set as complete
    _print_report(manifest, time.perf_counter() - start)
    return manifest


def _vocab_from_counts(sources, counters, min_count) -> dict[str, np.ndarray]:
    if not sum(src.rows["train"] for src in sources):
        raise DataError("no well-formed training rows to count the vocabulary on; give training data, "
                        "or reuse an earlier vocabulary with --vocab DIR")
    return _build_vocab(counters, min_count)


def _print_report(manifest: dict, seconds: float) -> None:
    for source in manifest["source_files"]:
        line = malformed_report(source, manifest["skipped"][source["name"]])
        if line:
            print(line, file=sys.stderr)
    print(_summary(manifest, seconds), file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
      help="Criteo TSV files, plain or gzip (detected from the content)")
    a("--out", required=True, metavar="DIR", help="a new or empty folder for the data set")
    a("--min-count", type=int, default=None, metavar="N",
      help="values seen fewer than N times in the training split get id 1 (default 1: keep every value "
           "seen in training; with --vocab: that vocabulary's)")
    a("--split", choices=("hash", "file"), default="hash",
      help="hash: each line by a hash of its bytes (default); file: whole files, see --valid-files")
    a("--valid-frac", type=float, default=None, help="--split hash: share of lines for valid (default 0.05)")
    a("--test-frac", type=float, default=None, help="--split hash: share of lines for test (default 0.05)")
    a("--valid-files", nargs="+", default=[], metavar="NAME", help="--split file: input files for valid")
    a("--test-files", nargs="+", default=[], metavar="NAME", help="--split file: input files for test")
    a("--vocab", metavar="DIR", help="map with the vocabulary of an earlier preprocess output, no counting")
    a("--strict", action="store_true", help="stop at the first malformed line instead of skipping it")
    a("--workers", type=int, default=os.cpu_count(), metavar="N",
      help="worker processes (default: all cores)")
    a("--chunk-lines", type=int, default=DEFAULT_CHUNK_LINES, metavar="N",
      help=f"lines per chunk and at most per shard (default {DEFAULT_CHUNK_LINES})")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise DataError(f"unexpected arguments: {' '.join(rest)}")
    manifest = preprocess(args.inputs, args.out, min_count=args.min_count, split=args.split,
                          valid_frac=args.valid_frac, test_frac=args.test_frac,
                          valid_files=args.valid_files, test_files=args.test_files, vocab=args.vocab,
                          strict=args.strict, workers=args.workers, chunk_lines=args.chunk_lines)
    print(f"wrote {args.out}: " + ", ".join(f"{manifest['splits'][s]['rows']} {s} rows" for s in SPLITS))
    return 0
