"""Which split each line goes to, and which intermediate parts make each shard.

    plan = split_plan(["day_0.gz", "day_1.gz"], "file", None, None, ["day_1.gz"], [])
    line_rule(plan, file_split(plan, "day_1.gz"))  # ("file", "valid"): every line of day_1.gz
    split_codes(b"...\n...\n", 2, ("hash", 0.05, 0.05))  # per line 0 train, 1 valid, 2 test
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from distrec.data.manifest import DataError

SPLITS = ("train", "valid", "test")  # split codes 0, 1, 2
DEFAULT_FRAC = 0.05  # of the lines, for each of valid and test under --split hash
HASH_SPLIT = ("crc32 of the line's bytes without its line ending, / 2**32: below valid_frac -> valid, "
              "below valid_frac + test_frac -> test, else train")


def split_plan(names, split, valid_frac, test_frac, valid_files, test_files) -> dict:
    """The manifest's "split" record, after checking the options fit together."""
    if split == "hash":
        if valid_files or test_files:
            raise DataError("--valid-files/--test-files need --split file")
        vf = DEFAULT_FRAC if valid_frac is None else float(valid_frac)
        tf = DEFAULT_FRAC if test_frac is None else float(test_frac)
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


def _named(names: list[str], given: Iterable[str], flag: str) -> list[str]:
    wanted = [Path(g).name for g in given]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise DataError(f"{flag} names files that are not inputs: {', '.join(unknown)} "
                        f"(inputs: {', '.join(names)})")
    return sorted(set(wanted))


def file_split(plan: dict, name: str) -> str | None:
    """The split all lines of file ``name`` go to under --split file; None under --split hash."""
    if plan["method"] == "hash":
        return None
    return "valid" if name in plan["valid_files"] else "test" if name in plan["test_files"] else "train"


def line_rule(plan: dict, split: str | None) -> tuple:
    """How split_codes places a file's lines: ("file", split name) or ("hash", valid_frac, test_frac)."""
    return ("file", split) if split else ("hash", plan["valid_frac"], plan["test_frac"])


def split_codes(data: bytes, n: int, rule: tuple) -> np.ndarray:
    """The split code of each of the n lines in data (LF endings), by line_rule's rule."""
    if rule[0] == "file":
        return np.full(n, SPLITS.index(rule[1]), np.int8)
    _, valid_frac, test_frac = rule
    lines = data.split(b"\n")[:n]  # [:n] drops the empty string after a final newline
    u = np.fromiter(map(zlib.crc32, lines), np.uint32, n) / 2.0**32
    return np.where(u < valid_frac, 1, np.where(u < valid_frac + test_frac, 2, 0)).astype(np.int8)


def shard_groups(parts: list[dict], max_rows: int) -> list[tuple[str, list[str]]]:
    """(split, intermediate files) per shard, in input order; parts: per chunk {split: (path, rows)}.
    Consecutive parts of a split are joined while they fit in max_rows: valid and test get a sliver of
    every chunk, which alone would make many small shards. Depends only on the input and chunk_lines,
    never on timing."""
    pending, rows, shards = {name: [] for name in SPLITS}, dict.fromkeys(SPLITS, 0), []
    for chunk in parts:
        for name, (path, n) in chunk.items():
            if pending[name] and rows[name] + n > max_rows:
                shards.append((name, pending[name]))
                pending[name], rows[name] = [], 0
            pending[name].append(path)
            rows[name] += n
    return shards + [(name, pending[name]) for name in SPLITS if pending[name]]
