"""The on-disk data set: Parquet shards per split plus ``manifest.json``.

Layout written by ``distrec data synth`` and ``distrec data preprocess`` and read by the loader::

    DIR/manifest.json
    DIR/train/part-00000.parquet ...
    DIR/valid/part-00000.parquet ...

Columns: the label (float32), each dense feature (float32, already transformed), each categorical
feature (int64 ids for one-hot, list<int64> for multi-hot). The manifest records the schema, per-table
cardinalities, per-split rows and files, and how the data was made.

    m = read_manifest("runs/demo/data")
    m["splits"]["train"]["rows"]
"""
from __future__ import annotations

import json
from pathlib import Path

from sharding.files import atomic_write, read_versioned_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class DataError(ValueError):
    """A problem with a data set on disk, naming the file."""


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write atomically: a reader never sees half a manifest."""
    path = Path(out_dir) / MANIFEST
    atomic_write(path, json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2, sort_keys=True))
    return path


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; make the data with `distrec data synth` or "
                        f"`distrec data preprocess` first")
    return read_versioned_json(path, "format_version", FORMAT_VERSION, DataError, "manifest")


def split_files(data_dir: str | Path, manifest: dict, split: str) -> list[Path]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{Path(data_dir) / MANIFEST}: no split '{split}' (has: {', '.join(splits)})")
    files = [Path(data_dir) / f for f in splits[split]["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{Path(data_dir) / MANIFEST}: split '{split}' lists missing files: "
                        f"{', '.join(missing[:5])}")
    return files


def check_schema(manifest: dict, label: str, dense: list[str], categorical: list[str], where: str) -> None:
    """The config's schema must name columns the data has."""
    have = manifest["schema"]
    for kind, want in (("dense", dense), ("categorical", categorical)):
        missing = [c for c in want if c not in have[kind]]
        if missing:
            raise DataError(f"{where}: schema.{kind} names columns the data does not have: "
                            f"{', '.join(missing)} (data has {', '.join(have[kind]) or 'none'})")
    if label != have["label"]:
        raise DataError(f"{where}: schema.label is '{label}' but the data's label is '{have['label']}'")
