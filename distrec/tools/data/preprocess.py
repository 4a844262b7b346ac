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

The parts, in the order the data meets them: ``sources`` (reading files in chunks of whole lines),
``tsv_parse`` (checking and parsing a chunk), ``splits`` (split planning, which parts make a shard),
``pass_jobs`` (what a worker does for a chunk or a shard), ``passes`` (handing those out in order),
``vocab`` (counts, threshold, ids), ``preprocess_report`` (manifest, malformed-line report, summary).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from distrec.data.manifest import DataError, write_manifest
from distrec.tools.data.passes import executor, pass1, pass2
from distrec.tools.data.preprocess_report import build_manifest, print_malformed, print_report, skipped_by_file
from distrec.tools.data.sources import Source
from distrec.tools.data.splits import SPLITS, file_split, split_plan
from distrec.tools.data.vocab import build_vocab, load_vocab, save_vocab, vocab_source

DEFAULT_CHUNK_LINES = 200_000  # ~50 MB of Criteo text; a worker peaks near 0.5 GB parsing one
TMP_DIR = ".preprocess-tmp"


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
    plan = split_plan([p.name for p in paths], split, valid_frac, test_frac, valid_files, test_files)
    vocab_from, min_count = vocab_source(vocab, min_count)
    opts = {"vocab": vocab_from, "strict": strict, "chunk_lines": _positive(chunk_lines, "--chunk-lines"),
            "workers": _positive((os.cpu_count() or 1) if workers is None else workers, "--workers")}
    sources = [Source(p, file_split(plan, p.name)) for p in paths]
    table_vocab = None if vocab_from is None else load_vocab(vocab_from)
    out = _prepare_out(out_dir)
    (out / TMP_DIR).mkdir()
    try:
        with executor(opts["workers"]) as ex:
            parts, counters = pass1(ex, sources, plan, out / TMP_DIR, opts, progress)
            if table_vocab is None:
                table_vocab = _vocab_from_counts(sources, counters, min_count)
            save_vocab(out, table_vocab)
            splits = pass2(ex, out, parts, opts, progress)
    finally:
        shutil.rmtree(out / TMP_DIR, ignore_errors=True)
    manifest = build_manifest(sources, splits, table_vocab, plan, min_count, vocab_from, opts["chunk_lines"])
    write_manifest(out, manifest)  # last: a reader never sees a half-written data set as complete
    print_report(manifest, time.perf_counter() - start)
    return manifest


def _vocab_from_counts(sources: list[Source], counters, min_count: int) -> dict[str, np.ndarray]:
    if not sum(src.rows["train"] for src in sources):
        # the malformed-line report usually says why, so it comes first, as in a finished run
        print_malformed([src.record() for src in sources], skipped_by_file(sources))
        raise DataError(_no_training_rows(sources))
    return build_vocab(counters, min_count)


def _no_training_rows(sources: list[Source]) -> str:
    """One line naming the files whose lines could have gone to train, and what became of them."""
    train = [src for src in sources if src.split in (None, "train")]
    names = ", ".join(str(src.path) for src in train) or "no input goes to train (--split file)"
    lines = sum(src.lines for src in train)
    bad = sum(rec["count"] for src in train for rec in src.skipped.values())
    placed = " and ".join(f"{sum(src.rows[s] for src in train)} {s}" for s in SPLITS[1:])
    return (f"{names}: no well-formed training rows to count the vocabulary on ({lines} lines: {bad} "
            f"malformed, {placed} rows); give training data, or reuse an earlier vocabulary with --vocab DIR")


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


# ---------------------------------------------------------------- the command


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
