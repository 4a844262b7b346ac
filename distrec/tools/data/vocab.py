"""The vocabulary of a preprocessed data set: value counts, the min_count threshold, hex value -> id.

    vocab = load_vocab("runs/criteo")            # {"C1": sorted int64 hex values, ...}
    map_ids(np.array([-1, 0x68fd1e64]), vocab["C1"])  # [0 missing, 1 rare/unseen or index + 2]

On disk ``DIR/vocab/C1.npy ..``: the sorted int64 hex values of the frequent values; the value at index
i has id i + 2, so that ``--vocab DIR`` maps later days to the same ids without counting.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distrec.config import CRITEO_CATEGORICAL
from distrec.data.manifest import DataError, read_manifest

VOCAB_DIR = "vocab"
MERGE_EVERY = 32  # chunks' counts held per column before they are merged into one


class Counts:
    """Value counts of one column, merged over chunks in batches: memory stays near the number of
    distinct values, not the sum over chunks."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        self.parts.append((values, counts))
        if len(self.parts) >= MERGE_EVERY:
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


def value_counts(cats: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per column of cats [columns, rows] (-1 missing): its distinct values and their counts."""
    return [np.unique(col[col >= 0], return_counts=True) for col in cats]


def build_vocab(counters: list[Counts], min_count: int) -> dict[str, np.ndarray]:
    vocab = {}
    for col, counter in zip(CRITEO_CATEGORICAL, counters):
        values, counts = counter.result()
        vocab[col] = values[counts >= min_count]
    return vocab


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


def column_path(data_dir: str | Path, col: str) -> Path:
    return Path(data_dir) / VOCAB_DIR / f"{col}.npy"


def load_vocab(data_dir: str | Path) -> dict[str, np.ndarray]:
    """The vocabulary of a preprocessed data set: per table, the sorted hex values with ids 2, 3, .."""
    vocab = {}
    for col in CRITEO_CATEGORICAL:
        path = column_path(data_dir, col)
        try:
            v = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the vocabulary: {e}") from None
        if v.dtype != np.int64 or v.ndim != 1 or np.any(v[1:] <= v[:-1]):
            raise DataError(f"{path}: not a vocabulary (a sorted 1-D int64 array of distinct values)")
        vocab[col] = v
    return vocab


def save_vocab(out: Path, vocab: dict[str, np.ndarray]) -> None:
    (out / VOCAB_DIR).mkdir()
    for col, values in vocab.items():
        np.save(column_path(out, col), values)


def vocab_source(vocab: str | Path | None, min_count: int | None) -> tuple[Path | None, int]:
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
