"""The two passes over the input, run from the main process on a pool of workers.

    with executor(workers=8) as ex:
        parts, counters = pass1(ex, sources, plan, tmp, opts, progress=True)
        ...  # the vocabulary from counters, saved under out/vocab
        splits = pass2(ex, out, parts, opts, progress=True)  # {"train": {"rows", "files"}, ...}

Chunks and shards are handed out in input order and their results taken in that order, so the output
does not depend on the number of workers or on timing.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from distrec.config import CRITEO_CATEGORICAL
from distrec.data.manifest import DataError
from distrec.tools.data.pass_jobs import Chunk, parse_chunk, write_shard
from distrec.tools.data.sources import Source, read_chunks
from distrec.tools.data.splits import SPLITS, line_rule, shard_groups
from distrec.tools.data.tsv_parse import REASONS
from distrec.tools.data.vocab import Counts

IN_FLIGHT_PER_WORKER = 2  # jobs submitted ahead per worker: enough to keep it busy, bounded memory


@contextlib.contextmanager
def executor(workers: int) -> Iterator[Executor]:
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


def _chunk_jobs(sources: list[Source], plan: dict, tmp: Path, chunk_lines: int,
                count: bool) -> Iterator[Chunk]:
    done = 0  # bytes of the files before this one
    for fi, src in enumerate(sources):
        rule = line_rule(plan, src.split)
        for ci, (first, data, read) in enumerate(read_chunks(src, chunk_lines)):
            yield Chunk(fi, ci, first, data, rule, count, str(tmp), done + read)
        done += src.bytes


def pass1(ex, sources, plan, tmp, opts, progress) -> tuple[list[dict], list[Counts] | None]:
    """Parse every chunk; returns the intermediate parts per chunk and the value counts (None when
    the vocabulary is given)."""
    counters = [Counts() for _ in CRITEO_CATEGORICAL] if opts["vocab"] is None else None
    parts = []
    total = sum(src.path.stat().st_size for src in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="parse", disable=not progress, file=sys.stderr)
    with bar:
        jobs = _chunk_jobs(sources, plan, tmp, opts["chunk_lines"], counters is not None)
        for res in _ordered(ex, parse_chunk, jobs, IN_FLIGHT_PER_WORKER * opts["workers"]):
            bar.update(res["read_to"] - bar.n)  # as chunks are done, not as they are read ahead
            _take_chunk(sources[res["file_index"]], res, opts["strict"])
            parts.append(res["parts"])
            for counter, (values, counts) in zip(counters or (), res["counts"] or ()):
                counter.add(values, counts)
        bar.update(total - bar.n)
    return parts, counters


def _take_chunk(src: Source, res: dict, strict: bool) -> None:
    if strict and res["first_bad"]:
        line, key, detail = res["first_bad"]
        raise DataError(f"{src.path} line {line}: {dict(REASONS)[key]}: {detail} (--strict)")
    src.add_malformed(res["malformed"])
    for name, (_, n) in res["parts"].items():
        src.rows[name] += n


def pass2(ex, out: Path, parts: list[dict], opts: dict, progress: bool) -> dict:
    """Map the intermediate parts to ids and write the shards, numbered per split in input order."""
    splits = {name: {"rows": 0, "files": []} for name in SPLITS}
    jobs = []
    for name, paths in shard_groups(parts, opts["chunk_lines"]):
        rel = f"{name}/part-{len(splits[name]['files']):05d}.parquet"
        splits[name]["files"].append(rel)
        jobs.append((paths, str(out / rel), str(out)))
    for name in SPLITS:
        (out / name).mkdir()
    bar = tqdm(total=len(jobs), unit="shard", desc="write", disable=not progress, file=sys.stderr)
    with bar:
        window = IN_FLIGHT_PER_WORKER * opts["workers"]
        for job, rows in zip(jobs, _ordered(ex, write_shard, jobs, window)):
            splits[Path(job[1]).parent.name]["rows"] += rows
            bar.update()
    return splits
