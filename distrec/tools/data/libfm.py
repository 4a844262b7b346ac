"""libFM files (as the public CTR benchmarks ship them) -> Criteo-layout TSV that ``distrec data
preprocess`` reads, so that they get distrec's shards, vocabularies and manifest like any other data.

    distrec data libfm --in ml-tag.train.libfm ml-tag.validation.libfm ml-tag.test.libfm --out runs/ml-tag/tsv
    distrec data preprocess --in runs/ml-tag/tsv/*.tsv --out runs/ml-tag/data --split file \\
        --valid-files ml-tag.validation.tsv --test-files ml-tag.test.tsv

A libFM line is ``LABEL IDX:VALUE ...`` with one feature per field in field order (the NFM/BARS files:
MovieLens-tag has user, item, tag; Frappe 10 fields), LABEL -1 or 1 (or 0 or 1), every VALUE 1 (one-hot).
The k-th feature of a line becomes categorical column C{k+1}, its global index written in hex, the 13
dense columns are left empty (a config with ``schema.preset = "none"``, ``dense = []`` and
``categorical = ["C1", ..]`` reads only the columns that exist). A line of another shape is an error
naming the file and line: a silently shifted field would train on the wrong features.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from distrec.data.manifest import DataError

CRITEO_DENSE, CRITEO_CATEGORICAL = 13, 26
LABELS = {"-1": "0", "0": "0", "1": "1", "+1": "1"}


class LibfmError(DataError):
    """A line that is not one-hot libFM with the file's field count; the message names file and line."""


def tsv_line(line: str, fields: int | None, where: str) -> tuple[str, int]:
    """(the Criteo TSV line, its field count) of one libFM line."""
    label, *features = line.split()
    if label not in LABELS:
        raise LibfmError(f"{where}: label {label!r} is not -1, 0 or 1")
    if fields is not None and len(features) != fields:
        raise LibfmError(f"{where}: {len(features)} features, the file's first line has {fields}")
    if not 0 < len(features) <= CRITEO_CATEGORICAL:
        raise LibfmError(f"{where}: {len(features)} features; 1 to {CRITEO_CATEGORICAL} fit the layout")
    cats = []
    for f in features:
        index, _, value = f.partition(":")
        if not index.isdigit() or value not in ("1", "1.0", "1.000000"):
            raise LibfmError(f"{where}: feature {f!r} is not INDEX:1 (one-hot)")
        cats.append(format(int(index), "x"))
    cats += [""] * (CRITEO_CATEGORICAL - len(cats))
    return "\t".join([LABELS[label], *[""] * CRITEO_DENSE, *cats]), len(features)


def convert(src: Path, out_dir: Path) -> tuple[Path, int, int]:
    """Write ``out_dir/<src stem>.tsv``; returns (its path, lines, fields per line)."""
    dst = out_dir / f"{src.stem}.tsv"
    fields, n = None, 0
    with open(src) as f, open(dst, "w") as out:
        for n, line in enumerate(f, 1):
            if line.strip():
                text, fields = tsv_line(line, fields, f"{src}:{n}")
                out.write(text + "\n")
    if fields is None:
        raise LibfmError(f"{src}: no lines")
    return dst, n, fields


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE", help="libFM files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the .tsv files (made if missing)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = set()
    for src in map(Path, args.inputs):
        dst, lines, fields = convert(src, out)
        counts.add(fields)
        print(f"{src}: {lines} lines, {fields} fields -> {dst}")
    if len(counts) > 1:
        raise LibfmError(f"the files have different field counts {sorted(counts)}: they are not one data set")
    return 0
