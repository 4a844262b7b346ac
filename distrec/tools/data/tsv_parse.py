"""Parse one chunk of Criteo TSV lines with numpy: the fields, the checks, the malformed-line accounting.

    p = parse_lines(b"1\t5\t...\t68fd1e64\n", first_line=1)   # 40 tab-separated fields per line
    p.label, p.dense, p.cats  # the well-formed lines' label, log1p(dense) [13, rows], hex values [26, rows]
    p.malformed               # {"bad_hex_C4": (count, [first line numbers]), ...}

numpy loops over the few field lengths and the digits of each, never over lines or fields: a Python
object per line would cost about as much as parsing it.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, NamedTuple

import numpy as np

from distrec.config import CRITEO_CATEGORICAL, CRITEO_DENSE

NUM_FIELDS = 1 + len(CRITEO_DENSE) + len(CRITEO_CATEGORICAL)
FIRST_LINES = 5  # line numbers kept per file and reason
HEX_EXACT_DIGITS = 15  # up to 15 hex digits the value is the key; longer ones are hashed above 2**60
# Index = reason code: 0 field count, 1 label, 2..14 dense I1..I13, 15..40 categorical C1..C26, the
# order the fields are checked in (a line with several problems is counted once, under the first).
REASONS = (("wrong_field_count", "wrong field count"), ("bad_label", "bad label"),
           *((f"bad_dense_{c}", f"bad dense value in {c}") for c in CRITEO_DENSE),
           *((f"bad_hex_{c}", f"bad hex in {c}") for c in CRITEO_CATEGORICAL))
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


class Parsed(NamedTuple):
    label: np.ndarray  # [rows] float32, the well-formed lines only
    dense: np.ndarray  # [13, rows] float32, log(max(x, 0) + 1)
    cats: np.ndarray  # [26, rows] int64 hex values, -1 missing
    reason: np.ndarray  # per line of the chunk: -1 fine, else its index into REASONS
    malformed: dict  # {reason key: (count, first line numbers)}
    first_bad: tuple | None  # (line number, reason key, detail) of the first malformed line


def parse_lines(data: bytes, first_line: int) -> Parsed:
    """Parse and check whole lines (LF endings); first_line: the 1-based number of the first one."""
    a = np.frombuffer(data, np.uint8)
    nfields, ok, fs, fe = _split_fields(a)
    label, bad_label = _parse_label(a, fs[:, 0], fe[:, 0])
    dense, bad_dense = _by_column(_parse_dense, a, fs[:, 1:14], fe[:, 1:14])
    cats, bad_cats = _by_column(_parse_hex, a, fs[:, 14:], fe[:, 14:])
    reason = _reason_codes(ok, np.vstack([bad_label, bad_dense, bad_cats]))
    keep = reason[ok] < 0
    return Parsed(label[keep], dense[:, keep], cats[:, keep], reason, _malformed(reason, first_line),
                  _first_bad(data, reason, ok, nfields, fs, fe, first_line))


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
