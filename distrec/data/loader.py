"""Streams Parquet shards into per-rank batches.

    loader = ParquetLoader(files, columns, global_batch_size=4096, rank=0, world_size=2, seed=0)
    for batch in loader.epoch(0):          # Batch of 2048 rows: this rank's half of each global batch
        ...

The global batch sequence does not depend on the world size: epoch ``e`` is one stream of rows (row
groups in a seeded order, rows shuffled within each group), cut into global batches of
``global_batch_size``; rank r takes the r-th contiguous slice of each. So 1 rank and N ranks train on
the same global batches, and each rank decodes only the row groups its slices touch (keep row groups
small next to the local batch). The last partial batch is split over ranks as evenly as possible, or
dropped with ``drop_last``. Reading and decoding run ahead in a background thread.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from distrec.data.manifest import DataError, split_files
from sharding.jagged import JaggedBatch


GROUP_CACHE = 3  # decoded row groups kept per rank: a batch spans at most a few consecutive groups


@dataclass
class Columns:
    label: str
    dense: list[str]
    categorical: list[str]


@dataclass
class Batch:
    dense: torch.Tensor  # float32 [B, num_dense]
    sparse: JaggedBatch
    labels: torch.Tensor  # float32 [B]

    def __len__(self) -> int:
        return self.labels.shape[0]

    input_wait_s = 0.0  # its ids are exchanged inside the step (see trainer.pipeline.PipelinedBatch)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.dense.to(device, non_blocking=True), self.sparse.to(device),
                     self.labels.to(device, non_blocking=True))


@dataclass
class _Group:
    """One decoded row group. Categorical columns are (values, offsets) with offsets [n + 1]."""

    label: np.ndarray
    dense: np.ndarray
    cats: list[tuple[np.ndarray, np.ndarray]]


def _jagged_column(col: pa.ChunkedArray, where: str) -> tuple[np.ndarray, np.ndarray]:
    col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.null_count:
            raise DataError(f"{where}: null list entries; write empty lists instead")
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        offsets = col.offsets.to_numpy().astype(np.int64)
        return values[offsets[0]:], offsets - offsets[0]
    if col.null_count:
        raise DataError(f"{where}: {col.null_count} null ids")
    ids = col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return ids, np.arange(ids.size + 1, dtype=np.int64)


def _take_jagged(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bags of ``rows``, in that order: (values, lengths)."""
    lengths = offsets[rows + 1] - offsets[rows]
    if values.size == offsets.size - 1 and np.all(lengths == 1):  # one-hot: a plain gather
        return values[rows], lengths
    starts = np.repeat(offsets[rows] - np.r_[0, np.cumsum(lengths)[:-1]], lengths)
    return values[starts + np.arange(lengths.sum())], lengths


def make_loader(cfg, manifest: dict, split: str, ctx, train: bool) -> "ParquetLoader":
    """The loader of ``split`` for this rank (``ctx``: a DistContext), as the trainer reads it.

        train_loader = make_loader(cfg, read_manifest(cfg.data.path), "train", ctx, train=True)
    """
    s = cfg.schema
    return ParquetLoader(
        split_files(cfg.data.path, manifest, split), Columns(s.label, s.dense, s.categorical),
        global_batch_size=cfg.train.global_batch_size if train else cfg.eval.batch_size,
        rank=ctx.rank, world_size=ctx.world_size, seed=cfg.train.seed, shuffle=train and cfg.data.shuffle,
        drop_last=train and cfg.data.drop_last, prefetch_batches=cfg.data.prefetch_batches,
        max_rows=0 if train else cfg.eval.max_rows)


class ParquetLoader:
    def __init__(self, files: list[Path], columns: Columns, *, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 prefetch_batches: int = 4, max_rows: int = 0):
        self.files, self.columns = [Path(f) for f in files], columns
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.prefetch = seed, shuffle, drop_last, prefetch_batches
        self.groups = self._index(max_rows)  # [(file index, row group, rows)]
        self.num_rows = sum(g[2] for g in self.groups)
        self._handles: dict[int, pq.ParquetFile] = {}

    def _index(self, max_rows: int) -> list[tuple[int, int, int]]:
        groups, total = [], 0
        for fi, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{path}: cannot read Parquet metadata: {e}") from None
            self._check_columns(path, pf.schema_arrow.names)
            meta = pf.metadata
            for gi in range(meta.num_row_groups):
                rows = meta.row_group(gi).num_rows
                if max_rows:
                    rows = min(rows, max_rows - total)
                if rows > 0:
                    groups.append((fi, gi, rows))
                    total += rows
        return groups

    def _check_columns(self, path: Path, have: list[str]) -> None:
        c = self.columns
        missing = [n for n in [c.label, *c.dense, *c.categorical] if n not in have]
        if missing:
            raise DataError(f"{path}: no column(s) {', '.join(missing)} (the file has {', '.join(have)})")

    def num_batches(self) -> int:
        full, rest = divmod(self.num_rows, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _rng(self, epoch: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, *more])

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's group order and where each group starts in the stream."""
        order = self._rng(epoch).permutation(len(self.groups)) if self.shuffle else np.arange(len(self.groups))
        sizes = np.array([self.groups[g][2] for g in order], dtype=np.int64)
        return order, np.r_[0, np.cumsum(sizes)]

    def local_range(self, batch: int) -> tuple[int, int]:
        """This rank's [start, end) stream positions in global batch ``batch``."""
        start = batch * self.global_batch_size
        size = min(self.global_batch_size, self.num_rows - start)
        return start + size * self.rank // self.world_size, start + size * (self.rank + 1) // self.world_size

    def _read_group(self, g: int) -> _Group:
        fi, gi, rows = self.groups[g]
        path, c = self.files[fi], self.columns
        if fi not in self._handles:
            self._handles[fi] = pq.ParquetFile(path)
        try:
            table = self._handles[fi].read_row_group(gi, columns=[c.label, *c.dense, *c.categorical])
        except (KeyError, pa.ArrowInvalid) as e:
            raise DataError(f"{path}: row group {gi}: {e}") from None
        table = table.slice(0, rows)
        dense = np.stack([table[n].to_numpy(zero_copy_only=False) for n in c.dense], 1) if c.dense \
            else np.zeros((rows, 0))
        cats = [_jagged_column(table[n], f"{path}: column {n}") for n in c.categorical]
        return _Group(table[c.label].to_numpy(zero_copy_only=False).astype(np.float32),
                      dense.astype(np.float32, copy=False), cats)

    def _segments(self, epoch: int, lo: int, hi: int, order, starts) -> Iterator[tuple[int, np.ndarray]]:
        """(group, rows within it) covering stream positions [lo, hi)."""
        k = int(np.searchsorted(starts, lo, side="right")) - 1
        while lo < hi:
            g = int(order[k])
            a, b = lo - starts[k], min(hi, starts[k + 1]) - starts[k]
            perm = self._rng(epoch, 1, g).permutation(self.groups[g][2]) if self.shuffle \
                else np.arange(self.groups[g][2])
            yield g, perm[a:b]
            lo, k = starts[k] + b, k + 1

    def origin(self, groups: list[int]) -> str:
        """Where a batch's rows came from, for error messages: "FILE row group 2", or runs such as
        "FILE row groups 2-3, OTHER row group 0" (a batch can span groups, and files when shuffled)."""
        runs: list[list] = []  # [file index, first row group, last row group]
        for g in groups:
            fi, gi, _ = self.groups[g]
            if runs and runs[-1][0] == fi and runs[-1][2] + 1 == gi:
                runs[-1][2] = gi
            else:
                runs.append([fi, gi, gi])
        return ", ".join(f"{self.files[fi]} row group {a}" if a == b else f"{self.files[fi]} row groups {a}-{b}"
                         for fi, a, b in runs)

    def _make_batch(self, parts: list[tuple[_Group, np.ndarray]], origin: str) -> Batch:
        label = np.concatenate([grp.label[rows] for grp, rows in parts]) if parts else np.zeros(0, np.float32)
        dense = np.concatenate([grp.dense[rows] for grp, rows in parts]) if parts \
            else np.zeros((0, len(self.columns.dense)), np.float32)
        values, lengths = [], []
        for f in range(len(self.columns.categorical)):
            taken = [_take_jagged(*grp.cats[f], rows) for grp, rows in parts]
            values.append(torch.from_numpy(np.concatenate([v for v, _ in taken]) if taken else np.zeros(0, np.int64)))
            lengths.append(torch.from_numpy(np.concatenate([n for _, n in taken]) if taken else np.zeros(0, np.int64)))
        sparse = JaggedBatch.from_per_key(self.columns.categorical, values, lengths, origin)
        return Batch(torch.from_numpy(dense), sparse, torch.from_numpy(label))

    def _produce(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        order, starts = self._order(epoch)
        cache: dict[int, _Group] = {}
        for b in range(start_batch, self.num_batches()):
            parts, groups = [], []
            for g, rows in self._segments(epoch, *self.local_range(b), order, starts):
                groups.append(g)
                if g not in cache:
                    if len(cache) >= GROUP_CACHE:  # the stream visits groups in order: drop the oldest
                        del cache[next(iter(cache))]
                    cache[g] = self._read_group(g)
                parts.append((cache[g], rows))
            yield self._make_batch(parts, self.origin(groups))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from global batch ``start_batch`` on (for resuming)."""
        if self.prefetch <= 0:
            yield from self._produce(epoch, start_batch)
            return
        yield from _background(self._produce(epoch, start_batch), self.prefetch)


_DONE = object()
READER_JOIN_S = 30.0
READER_THREAD = "distrec-loader"


def _background(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a thread, ``depth`` ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Queue ``item`` unless the consumer has stopped (then a full queue is never drained)."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=work, daemon=True, name=READER_THREAD)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Wait for the reader to finish its current row group: a thread still inside pyarrow when the
        # interpreter exits can crash the process after the work is done.
        thread.join(timeout=READER_JOIN_S)
