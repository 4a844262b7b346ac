"""What a preprocess run records and prints: the manifest, the malformed-line report, the summary.

    print_malformed([src.record()], {"day_0.gz": src.skipped})
    # stderr: day_0.gz: 3 malformed lines skipped: 2 wrong field count (lines 7, 19), 1 bad hex in C4
    # (line 12)
"""
from __future__ import annotations

import sys

from distrec.config import CRITEO_CATEGORICAL, CRITEO_DENSE
from distrec.tools.data.pass_jobs import LABEL, ROW_GROUP_SIZE
from distrec.tools.data.splits import SPLITS
from distrec.tools.data.tsv_parse import REASONS
from distrec.tools.data.vocab import VOCAB_DIR


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


def print_malformed(source_files: list[dict], skipped: dict) -> None:
    """malformed_report of each file that has malformed lines, to stderr; skipped: by file name."""
    for source in source_files:
        line = malformed_report(source, skipped[source["name"]])
        if line:
            print(line, file=sys.stderr)


def _summary(manifest: dict, seconds: float) -> str:
    rows = sum(s["rows"] for s in manifest["splits"].values())
    lines = sum(s["lines"] for s in manifest["source_files"])
    per_split = ", ".join(f"{manifest['splits'][name]['rows']:,} {name}" for name in SPLITS)
    return (f"preprocess: {lines:,} lines -> {per_split} rows ({manifest['skipped_total']:,} malformed "
            f"lines skipped) in {seconds:.1f} s: {rows / max(seconds, 1e-9):,.0f} rows/s")


def print_report(manifest: dict, seconds: float) -> None:
    print_malformed(manifest["source_files"], manifest["skipped"])
    print(_summary(manifest, seconds), file=sys.stderr)


def build_manifest(sources, splits, vocab, plan, min_count, vocab_from, chunk_lines) -> dict:
    """The manifest of a finished run; sources: the sources.Source of each input, in order."""
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
        "skipped": skipped_by_file(sources),
        "skipped_total": sum(rec["count"] for src in sources for rec in src.skipped.values()),
        "chunk_lines": chunk_lines,
        "row_group_size": ROW_GROUP_SIZE,
    }


def skipped_by_file(sources) -> dict:
    return {src.path.name: src.skipped for src in sources}
