"""Rows/s of ``distrec data preprocess`` on synthetic Criteo lines, with 1 and with 2 workers.

    .venv/bin/python benchmarks/preprocess_rows_per_s.py --rows 1000000 --workers 1 2

The lines look like real Criteo days: labels with a 25% click rate, lognormal dense counts (some
missing, some negative), 8-digit hex categoricals drawn Zipf-like from tables of 10 to 1,000,000 values
(some missing). The time counted is the whole ``preprocess`` call: reading, both passes, the manifest.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from distrec.tools.data.preprocess import preprocess


def _hex_table(rng: np.random.Generator, size: int) -> np.ndarray:
    """size random 8-digit hex strings, then "" (missing)."""
    return np.append(np.char.zfill(np.char.mod("%x", rng.integers(0, 2**32, size)), 8), "")


def _column_strings(rng: np.random.Generator, n: int, hexes: np.ndarray) -> list[str]:
    ids = np.minimum(rng.zipf(1.3, n) - 1, hexes.size - 2)
    ids[rng.random(n) < 0.1] = hexes.size - 1  # missing
    return hexes[ids].tolist()


def _dense_strings(rng: np.random.Generator, n: int) -> list[str]:
    counts = np.floor(rng.lognormal(1.5, 1.5, n)).astype(np.int64)
    counts[rng.random(n) < 0.02] = -1
    out = counts.astype(str)
    out[rng.random(n) < 0.2] = ""
    return out.tolist()


def write_synthetic(path: Path, rows: int, seed: int = 0, block: int = 100_000) -> None:
    """Criteo-format lines, generated and written a block at a time."""
    rng = np.random.default_rng(seed)
    tables = [_hex_table(rng, int(size)) for size in np.geomspace(10, 1_000_000, 26)]
    with open(path, "w") as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            cols = [(rng.random(n) < 0.25).astype(int).astype(str).tolist()]
            cols += [_dense_strings(rng, n) for _ in range(13)]
            cols += [_column_strings(rng, n, t) for t in tables]
            f.writelines("\t".join(fields) + "\n" for fields in zip(*cols))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunk-lines", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "day_0.tsv"
        t0 = time.perf_counter()
        write_synthetic(src, args.rows)
        print(f"generated {args.rows:,} lines ({src.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
        for workers in args.workers:
            t0 = time.perf_counter()
            m = preprocess([src], Path(tmp) / f"out-{workers}", workers=workers,
                           chunk_lines=args.chunk_lines, progress=False)
            seconds = time.perf_counter() - t0
            rows = sum(s["rows"] for s in m["splits"].values())
            print(f"workers={workers}: {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s")


if __name__ == "__main__":
    main()
