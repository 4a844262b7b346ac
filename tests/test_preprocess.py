"""`distrec data preprocess`: Criteo TSV -> Parquet shards + manifest, checked against hand-computed rows
and a line-by-line Python reference of the same rules."""
from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import math
import random
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distrec.config import CRITEO_CATEGORICAL, CRITEO_DENSE
from distrec.data.manifest import DataError, read_manifest
from distrec.tools.data.preprocess import DEFAULT_CHUNK_LINES, preprocess
from distrec.tools.data.sources import line_chunks
from distrec.tools.data.vocab import load_vocab, map_ids

REPO = Path(__file__).resolve().parents[1]
ALL_TRAIN = {"valid_frac": 0.0, "test_frac": 0.0}


# ---------------------------------------------------------------- making Criteo files


def random_line(rng: random.Random, pools: list[list[str]]) -> str:
    fields = [str(rng.randint(0, 1))]
    for _ in CRITEO_DENSE:
        r = rng.random()
        fields.append("" if r < 0.2 else str(-rng.randint(1, 3)) if r < 0.25 else str(rng.randint(0, 5000)))
    for pool in pools:
        fields.append("" if rng.random() < 0.1 else pool[min(int(rng.expovariate(0.3)), len(pool) - 1)])
    return "\t".join(fields)


def hex_pools(rng: random.Random, sizes=range(3, 29)) -> list[list[str]]:
    return [[f"{rng.getrandbits(32):08x}" for _ in range(n)] for n in sizes]


def criteo_lines(n: int, seed: int, planted: dict[int, str] | None = None) -> list[str]:
    """n lines (1-based line numbers); planted lines replace the random ones at those numbers."""
    rng = random.Random(seed)
    pools = hex_pools(rng)
    lines = [random_line(rng, pools) for _ in range(n)]
    for number, text in (planted or {}).items():
        lines[number - 1] = text
    return lines


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good_fields(label="1", dense=None, cats=None) -> list[str]:
    dense = list(dense) if dense is not None else ["1"] * 13
    cats = list(cats) if cats is not None else ["0000000a"] * 26
    return [label, *dense, *cats]


def with_field(column: str, value: str, label: str = "0") -> str:
    fields = good_fields(label)
    fields[(["label"] + CRITEO_DENSE + CRITEO_CATEGORICAL).index(column)] = value
    return "\t".join(fields)


# ---------------------------------------------------------------- reading the output


def read_split(out: Path, manifest: dict, split: str) -> dict[str, np.ndarray]:
    files = manifest["splits"][split]["files"]
    if not files:
        return {}
    tables = [pq.read_table(out / f) for f in files]
    names = tables[0].column_names
    return {name: np.concatenate([t.column(name).to_numpy() for t in tables]) for name in names}


def shard_bytes(out: Path, manifest: dict) -> dict[str, bytes]:
    return {f: (out / f).read_bytes() for s in manifest["splits"].values() for f in s["files"]}


# ---------------------------------------------------------------- a line-by-line reference


def reference_parse(line: str):
    """(label, dense, hex values or None) or the reason key of the line's first problem."""
    fields = line.split("\t")
    if len(fields) != 40:
        return "wrong_field_count"
    if fields[0] not in ("0", "1"):
        return "bad_label"
    dense = []
    for name, f in zip(CRITEO_DENSE, fields[1:14]):
        if f and not re.fullmatch(r"-?[0-9]+", f):
            return f"bad_dense_{name}"
        dense.append(math.log(max(int(f or 0), 0) + 1))
    cats = []
    for name, f in zip(CRITEO_CATEGORICAL, fields[14:]):
        if f and not re.fullmatch(r"[0-9a-fA-F]+", f):
            return f"bad_hex_{name}"
        cats.append(int(f, 16) if f else None)
    return int(fields[0]), dense, cats


def reference_split(line: str, valid_frac: float, test_frac: float) -> str:
    u = zlib.crc32(line.encode()) / 2**32
    return "valid" if u < valid_frac else "test" if u < valid_frac + test_frac else "train"


def reference(lines: list[str], min_count: int, valid_frac: float, test_frac: float):
    """Expected rows per split, expected skipped record, expected cardinalities."""
    parsed = [(reference_parse(line), line) for line in lines]
    rows = {s: [] for s in ("train", "valid", "test")}
    skipped = {}
    for number, (p, line) in enumerate(parsed, 1):
        if isinstance(p, str):
            rec = skipped.setdefault(p, {"count": 0, "first_lines": []})
            rec["count"] += 1
            rec["first_lines"] = (rec["first_lines"] + [number])[:5]
        else:
            rows[reference_split(line, valid_frac, test_frac)].append(p)
    vocab = []
    for j in range(26):
        counts = {}
        for _, _, cats in rows["train"]:
            if cats[j] is not None:
                counts[cats[j]] = counts.get(cats[j], 0) + 1
        vocab.append({v: i + 2 for i, v in enumerate(sorted(v for v, c in counts.items() if c >= min_count))})
    expected = {s: _expected_columns(r, vocab) for s, r in rows.items()}
    return expected, skipped, {c: 2 + len(v) for c, v in zip(CRITEO_CATEGORICAL, vocab)}


def _expected_columns(rows, vocab) -> dict[str, np.ndarray]:
    cols = {"label": np.array([r[0] for r in rows], np.float32)}
    for i, name in enumerate(CRITEO_DENSE):
        cols[name] = np.array([r[1][i] for r in rows], np.float64)
    for j, name in enumerate(CRITEO_CATEGORICAL):
        cols[name] = np.array([0 if r[2][j] is None else vocab[j].get(r[2][j], 1) for r in rows], np.int64)
    return cols


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert len(got.get("label", [])) == len(want["label"])
    if not len(want["label"]):
        return
    assert list(got) == ["label", *CRITEO_DENSE, *CRITEO_CATEGORICAL]
    np.testing.assert_array_equal(got["label"], want["label"])
    for name in CRITEO_DENSE:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
    for name in CRITEO_CATEGORICAL:
        assert got[name].dtype == np.int64
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------- tests


PLANTED = {
    7: "\t".join(good_fields()[:39]),  # 39 fields
    12: with_field("C4", "zz12ab34"),
    19: "\t".join(good_fields() + ["5"]),  # 41 fields
    25: with_field("I3", "1.5"),
    30: with_field("label", "2"),
    31: "",  # an empty line has 1 field
    40: with_field("I1", "abc"),
    50: "2\t" + "\t".join(good_fields()[1:-1] + ["nothex"]),  # bad label and bad hex: counted once, as label
    60: with_field("I13", "-"),
    **{n: with_field("C26", "12 34") for n in (100, 110, 120, 130, 140, 150)},
}
PLANTED_SKIPPED = {
    "wrong_field_count": {"count": 3, "first_lines": [7, 19, 31]},
    "bad_label": {"count": 2, "first_lines": [30, 50]},
    "bad_dense_I1": {"count": 1, "first_lines": [40]},
    "bad_dense_I3": {"count": 1, "first_lines": [25]},
    "bad_dense_I13": {"count": 1, "first_lines": [60]},
    "bad_hex_C4": {"count": 1, "first_lines": [12]},
    "bad_hex_C26": {"count": 6, "first_lines": [100, 110, 120, 130, 140]},
}
PLANTED_REPORT = ("day_0.tsv: 15 malformed lines skipped: 3 wrong field count (lines 7, 19, 31), "
                  "2 bad label (lines 30, 50), 1 bad dense value in I1 (line 40), 1 bad dense value in I3 "
                  "(line 25), 1 bad dense value in I13 (line 60), 1 bad hex in C4 (line 12), "
                  "6 bad hex in C26 (lines 100, 110, 120, 130, 140, ...)")


def test_malformed_lines_counted_by_reason_with_line_numbers(tmp_path, capsys):
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(300, seed=1, planted=PLANTED))
    m = preprocess([src], tmp_path / "out", chunk_lines=64, workers=1, progress=False)
    assert m["skipped"] == {"day_0.tsv": PLANTED_SKIPPED}
    assert m["skipped_total"] == 15
    (rec,) = m["source_files"]
    assert (rec["lines"], rec["rows_written"], rec["lines_skipped"]) == (300, 285, 15)
    assert sum(s["rows"] for s in m["splits"].values()) == 285
    assert PLANTED_REPORT in capsys.readouterr().err.splitlines()
    assert read_manifest(tmp_path / "out")["skipped"] == m["skipped"]


def test_output_matches_line_by_line_reference(tmp_path):
    rng = random.Random(5)
    lines = criteo_lines(600, seed=2)
    for i in rng.sample(range(600), 40):  # random damage of every kind
        fields = lines[i].split("\t")
        j = rng.randrange(40)
        fields[j] = rng.choice(["x", "1.5", "-", "+3", " 7", "g0", "", "0x1f", "\u00e9", "12\r"])
        lines[i] = "\t".join(fields[: rng.choice([40, 40, 40, 39, 41])] if rng.random() < 0.3 else fields)
    src = write_lines(tmp_path / "day.tsv", lines)
    # chunk_lines=13: 47 chunks, so value counts are merged in batches too (every 32 chunks)
    m = preprocess([src], tmp_path / "out", min_count=3, valid_frac=0.2, test_frac=0.1, chunk_lines=13,
                   workers=1, progress=False)
    expected, skipped, cardinalities = reference(lines, 3, 0.2, 0.1)
    assert m["skipped"]["day.tsv"] == skipped and m["skipped_total"] > 0
    assert m["cardinalities"] == cardinalities
    for split in ("train", "valid", "test"):
        assert m["splits"][split]["rows"] == len(expected[split]["label"])
        assert_matches(read_split(tmp_path / "out", m, split), expected[split])


def test_dlrm_transform_and_ids_by_hand(tmp_path):
    big = "1" + "0" * 16  # 17 hex digits: beyond int64 exactness, still a valid value
    rows = [
        good_fields("1", ["", "-3", "0", "1", "9", "1000"] + [""] * 7,
                    ["0000000a", "000000ff", "00000005", big] + [""] * 22),
        good_fields("0", ["7"] + ["-0"] * 12, ["a", "000000FF", "", big] + ["0"] * 22),
        good_fields("1", [""] * 13, ["00000000000000000000a", "", "", "2" + "0" * 16] + ["0"] * 22),
    ]
    src = write_lines(tmp_path / "hand.tsv", ["\t".join(r) for r in rows])
    m = preprocess([src], tmp_path / "out", min_count=2, **ALL_TRAIN, workers=1, progress=False)
    got = read_split(tmp_path / "out", m, "train")
    np.testing.assert_array_equal(got["label"], np.float32([1, 0, 1]))
    expect_dense = [[0, 0, 0, math.log(2), math.log(10), math.log(1001)],
                    [math.log(8), 0, 0, 0, 0, 0],
                    [0] * 6]
    for i, name in enumerate(CRITEO_DENSE[:6]):
        np.testing.assert_allclose(got[name], [row[i] for row in expect_dense], rtol=1e-6)
    # C1: 0xa three times (leading zeros and length do not matter) -> the one frequent value, id 2.
    # C2: 0xff twice (case does not matter) -> 2, missing -> 0. C3: 0x5 once -> rare, 1.
    # C4: the 17-digit value twice -> 2, another once -> 1. C5..: "0" twice -> 2, missing -> 0.
    assert got["C1"].tolist() == [2, 2, 2]
    assert got["C2"].tolist() == [2, 2, 0]
    assert got["C3"].tolist() == [1, 0, 0]
    assert got["C4"].tolist() == [2, 2, 1]
    assert got["C5"].tolist() == [0, 2, 2]
    assert m["cardinalities"]["C1"] == 3 and m["cardinalities"]["C3"] == 2 and m["cardinalities"]["C5"] == 3
    assert load_vocab(tmp_path / "out")["C2"].tolist() == [0xFF]


def test_vocab_reuse_maps_same_values_to_same_ids(tmp_path):
    first = criteo_lines(300, seed=3)
    second = criteo_lines(200, seed=3)[50:] + criteo_lines(50, seed=4)  # same value pools, new mix
    a = preprocess([write_lines(tmp_path / "day_0.tsv", first)], tmp_path / "a", min_count=3, **ALL_TRAIN,
                   workers=1, progress=False)
    b = preprocess([write_lines(tmp_path / "day_1.tsv", second)], tmp_path / "b", vocab=tmp_path / "a",
                   **ALL_TRAIN, workers=1, progress=False)
    assert b["cardinalities"] == a["cardinalities"] and b["min_count"] == 3
    assert b["vocab"]["from"] == str(tmp_path / "a")
    for col, values in load_vocab(tmp_path / "a").items():
        np.testing.assert_array_equal(load_vocab(tmp_path / "b")[col], values)
    ids_a, ids_b = read_split(tmp_path / "a", a, "train"), read_split(tmp_path / "b", b, "train")
    hex_a = [[f.split("\t")[14 + j] for f in first] for j in range(26)]
    hex_b = [[f.split("\t")[14 + j] for f in second] for j in range(26)]
    id_of = [dict(zip(hex_a[j], ids_a[c].tolist())) for j, c in enumerate(CRITEO_CATEGORICAL)]
    seen_rare = seen_frequent = 0
    for j, col in enumerate(CRITEO_CATEGORICAL):
        for value, got in zip(hex_b[j], ids_b[col].tolist()):
            assert got == id_of[j].get(value, 0 if value == "" else 1), (col, value)
            seen_rare += got == 1
            seen_frequent += got >= 2
    assert seen_rare and seen_frequent
    with pytest.raises(DataError, match="min_count 3"):
        preprocess([tmp_path / "day_1.tsv"], tmp_path / "c", vocab=tmp_path / "a", min_count=5,
                   progress=False)


def test_gzip_and_plain_give_identical_shards(tmp_path):
    plain = write_lines(tmp_path / "day_0.tsv", criteo_lines(400, seed=6, planted={9: "oops"}))
    packed = tmp_path / "day_0_copy.tsv"  # no .gz: gzip is recognised by its magic bytes
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    m1 = preprocess([plain], tmp_path / "p", chunk_lines=128, workers=1, progress=False)
    m2 = preprocess([packed], tmp_path / "g", chunk_lines=128, workers=1, progress=False)
    assert shard_bytes(tmp_path / "p", m1) == shard_bytes(tmp_path / "g", m2)
    # 4 chunks of <= 128 lines; the small valid and test parts of all chunks are joined into one shard
    rows = {s: [pq.ParquetFile(tmp_path / "p" / f).metadata.num_rows for f in m1["splits"][s]["files"]]
            for s in ("train", "valid", "test")}
    assert len(rows["train"]) == 4 and max(rows["train"]) <= 128
    assert len(rows["valid"]) == len(rows["test"]) == 1
    s1, s2 = m1["source_files"][0], m2["source_files"][0]
    assert s1["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    assert s2["sha256"] == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert (s1["bytes"], s2["bytes"]) == (plain.stat().st_size, packed.stat().st_size)
    assert s1["lines"] == s2["lines"] == 400
    assert m2["skipped"]["day_0_copy.tsv"] == {"wrong_field_count": {"count": 1, "first_lines": [9]}}


def test_pool_size_does_not_change_output(tmp_path):
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(500, seed=7, planted={3: "bad"}))
    m1 = preprocess([src], tmp_path / "w1", chunk_lines=60, workers=1, progress=False)
    m2 = preprocess([src], tmp_path / "w2", chunk_lines=60, workers=2, progress=False)
    assert len(m1["splits"]["train"]["files"]) == 9
    assert shard_bytes(tmp_path / "w1", m1) == shard_bytes(tmp_path / "w2", m2)
    assert m1["cardinalities"] == m2["cardinalities"] and m1["skipped"] == m2["skipped"]


def test_strict_stops_at_first_malformed_line(tmp_path):
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(300, seed=1, planted=PLANTED))
    with pytest.raises(DataError, match=r"day_0\.tsv line 7: wrong field count: expected 40 .* got 39"):
        preprocess([src], tmp_path / "out", strict=True, chunk_lines=64, workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    src2 = write_lines(tmp_path / "day_1.tsv", criteo_lines(30, seed=1, planted={12: PLANTED[12]}))
    with pytest.raises(DataError, match=r"day_1\.tsv line 12: bad hex in C4: 'zz12ab34'"):
        preprocess([src2], tmp_path / "out2", strict=True, workers=1, progress=False)
    clean = write_lines(tmp_path / "day_2.tsv", criteo_lines(30, seed=1))
    m = preprocess([clean], tmp_path / "out3", strict=True, workers=1, progress=False)
    assert m["skipped_total"] == 0


def test_hash_split_is_deterministic_per_line(tmp_path):
    lines = criteo_lines(1000, seed=8)
    lines[500:520] = lines[:20]  # a repeated line lands where its first copy did
    src = write_lines(tmp_path / "day_0.tsv", lines)
    m = preprocess([src], tmp_path / "a", valid_frac=0.1, test_frac=0.2, workers=1, progress=False)
    splits = [reference_split(line, 0.1, 0.2) for line in lines]
    want = {s: splits.count(s) for s in ("train", "valid", "test")}
    assert {s: m["splits"][s]["rows"] for s in want} == want
    assert 60 < want["valid"] < 140 and 150 < want["test"] < 250
    m2 = preprocess([src], tmp_path / "b", valid_frac=0.1, test_frac=0.2, workers=1, progress=False)
    assert shard_bytes(tmp_path / "a", m) == shard_bytes(tmp_path / "b", m2)
    assert m["split"]["method"] == "hash" and m["split"]["valid_frac"] == 0.1


def test_file_split_puts_named_files_in_valid_and_test(tmp_path):
    days = [write_lines(tmp_path / f"day_{i}.tsv", criteo_lines(100 + 10 * i, seed=10 + i)) for i in range(4)]
    only_valid = "\t".join(good_fields(cats=["0badcafe"] * 26))
    write_lines(days[2], criteo_lines(120, seed=12, planted={1: only_valid}))
    m = preprocess(days, tmp_path / "out", split="file", valid_files=["day_2.tsv"], test_files=[str(days[3])],
                   workers=1, progress=False)
    rows = {s: m["splits"][s]["rows"] for s in ("train", "valid", "test")}
    assert rows == {"train": 210, "valid": 120, "test": 130}
    assert m["split"] == {"method": "file", "valid_files": ["day_2.tsv"], "test_files": ["day_3.tsv"]}
    assert [s["split"] for s in m["source_files"]] == ["train", "train", "valid", "test"]
    valid = read_split(tmp_path / "out", m, "valid")
    assert valid["C1"][0] == 1  # seen only outside the training split: not in the vocabulary
    with pytest.raises(DataError, match="day_9.tsv"):
        preprocess(days, tmp_path / "x", split="file", valid_files=["day_9.tsv"], progress=False)
    with pytest.raises(DataError, match="--split file"):
        preprocess(days, tmp_path / "y", valid_files=["day_2.tsv"], progress=False)


def test_missing_input_and_bad_output_folder(tmp_path):
    with pytest.raises(DataError, match="nope.tsv: no such input file"):
        preprocess([tmp_path / "nope.tsv"], tmp_path / "out", progress=False)
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(20, seed=1))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError, match="not an empty folder"):
        preprocess([src], tmp_path / "full", progress=False)


def test_shards_have_row_groups_of_8192(tmp_path):
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(10_000, seed=9))
    m = preprocess([src], tmp_path / "out", **ALL_TRAIN, workers=1, progress=False)
    (path,) = m["splits"]["train"]["files"]
    meta = pq.ParquetFile(tmp_path / "out" / path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8192, 10_000 - 8192]
    assert m["schema"] == {"label": "label", "dense": CRITEO_DENSE, "categorical": CRITEO_CATEGORICAL}
    assert m["kind"] == "criteo" and m["splits"]["valid"] == {"rows": 0, "files": []}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrec", "data", "preprocess", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(300, seed=1, planted=PLANTED))
    out = tmp_path / "out"
    r = run_cli("--in", str(src), "--out", str(out), "--workers", "2", "--chunk-lines", "100",
                "--min-count", "2")
    assert r.returncode == 0, r.stderr
    assert PLANTED_REPORT in r.stderr.splitlines()
    assert re.search(r"preprocess: 300 lines -> .* in [0-9.]+ s: [0-9,]+ rows/s", r.stderr)
    m = json.loads((out / "manifest.json").read_text())
    rows = [f"{m['splits'][s]['rows']} {s} rows" for s in ("train", "valid", "test")]
    assert r.stdout.strip() == f"wrote {out}: {', '.join(rows)}"
    assert m["min_count"] == 2 and m["skipped"]["day_0.tsv"] == PLANTED_SKIPPED
    missing = run_cli("--in", str(tmp_path / "gone.tsv"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "distrec: error:" in missing.stderr and "gone.tsv" in missing.stderr
    extra = run_cli("--in", str(src), "--out", str(tmp_path / "o3"), "--bogus")
    assert extra.returncode == 2 and "unexpected arguments: --bogus" in extra.stderr
    strict = run_cli("--in", str(src), "--out", str(tmp_path / "o4"), "--strict")
    assert strict.returncode == 2 and "day_0.tsv line 7: wrong field count" in strict.stderr


@pytest.mark.parametrize("text", [b"a\nbb\n\nccc\nd\ne\nf", b"a\nbb\n\nccc\nd\ne\nf\n", b"", b"\n", b"abc"])
def test_line_chunks_cut_whole_lines(text):
    for block in (1, 2, 3, 64):
        for chunk_lines in (1, 2, 3, 100):
            chunks = list(line_chunks(io.BytesIO(text), chunk_lines, block))
            assert b"".join(data for _, data in chunks) == text
            lines = text.splitlines(keepends=True)
            starts = range(0, len(lines), chunk_lines)
            assert [n for n, _ in chunks] == [min(chunk_lines, len(lines) - i) for i in starts]
            assert [data for _, data in chunks] == [b"".join(lines[i:i + chunk_lines]) for i in starts]


@pytest.mark.parametrize("vocab_size,rows", [(50, 1000), (1000, 50), (0, 10)])
def test_map_ids_hash_and_binary_search_paths(vocab_size, rows):
    rng = np.random.default_rng(vocab_size)
    vocab = np.unique(rng.integers(0, 2**40, vocab_size))
    values = np.where(rng.random(rows) < 0.5, rng.choice(np.r_[vocab, 7], rows), rng.integers(0, 2**40, rows))
    values[::7] = -1  # missing
    ids = {v: i + 2 for i, v in enumerate(vocab.tolist())}
    want = [0 if v < 0 else ids.get(v, 1) for v in values.tolist()]
    assert map_ids(values, vocab).tolist() == want
    assert 0 in want and 1 in want and (vocab_size == 0 or max(want) >= 2)


def test_crlf_lines_give_the_same_shards(tmp_path):
    lines = criteo_lines(200, seed=11)
    lf = write_lines(tmp_path / "lf.tsv", lines)
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    m1 = preprocess([lf], tmp_path / "a", workers=1, progress=False)
    m2 = preprocess([crlf], tmp_path / "b", workers=1, progress=False)
    assert m2["skipped_total"] == 0 and shard_bytes(tmp_path / "a", m1) == shard_bytes(tmp_path / "b", m2)


@pytest.mark.parametrize("kwargs,message", [
    ({"workers": 0}, "--workers must be at least 1"),
    ({"chunk_lines": 0}, "--chunk-lines must be at least 1"),
    ({"min_count": 0}, "--min-count must be at least 1"),
    ({"valid_frac": 0.6, "test_frac": 0.4}, "sum to less than 1"),
    ({"split": "file", "valid_frac": 0.1}, "--split hash"),
    ({"split": "file", "valid_files": ["a.tsv"], "test_files": ["a.tsv"]}, "in both"),
    ({"split": "random"}, "'hash' or 'file'"),
])
def test_bad_options(tmp_path, kwargs, message):
    src = write_lines(tmp_path / "a.tsv", criteo_lines(5, seed=1))
    with pytest.raises(DataError, match=re.escape(message)):
        preprocess([src], tmp_path / "out", progress=False, **kwargs)


def test_bad_inputs(tmp_path):
    src = write_lines(tmp_path / "a.tsv", criteo_lines(5, seed=1))
    (tmp_path / "sub").mkdir()
    twin = write_lines(tmp_path / "sub" / "a.tsv", criteo_lines(5, seed=2))
    with pytest.raises(DataError, match="given more than once: a.tsv"):
        preprocess([src, twin], tmp_path / "out", progress=False)
    packed = tmp_path / "b.tsv"
    packed.write_bytes(bz2.compress(src.read_bytes()))
    with pytest.raises(DataError, match="b.tsv: bzip2-compressed"):
        preprocess([packed], tmp_path / "out", progress=False)
    only_bad = write_lines(tmp_path / "d.tsv", ["x"] * 5)
    with pytest.raises(DataError, match="no well-formed training rows"):
        preprocess([only_bad], tmp_path / "out3", progress=False)


def test_small_parts_are_joined_into_shards_of_at_most_chunk_lines(tmp_path):
    # chunks of 4 lines with 2, 2, 0 and 1 malformed: training parts of 2, 2, 4, 3 rows
    planted = {n: "x" for n in (1, 2, 7, 8, 16)}
    src = write_lines(tmp_path / "day_0.tsv", criteo_lines(16, seed=1, planted=planted))
    m = preprocess([src], tmp_path / "out", chunk_lines=4, **ALL_TRAIN, workers=1, progress=False)
    rows = [pq.ParquetFile(tmp_path / "out" / f).metadata.num_rows for f in m["splits"]["train"]["files"]]
    assert rows == [4, 4, 3]


def truncated_gzip(path: Path, text: bytes, keep: float) -> int:
    """Write the first `keep` of text's gzip bytes to path; returns the whole lines they still hold."""
    packed = gzip.compress(text)
    cut = packed[:int(len(packed) * keep)] if keep < 1 else packed[:-8]  # 1: all but the trailer
    path.write_bytes(cut)
    return zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")


@pytest.mark.parametrize("chunk_lines", [DEFAULT_CHUNK_LINES, 64])
@pytest.mark.parametrize("keep", [0.5, 1])
def test_truncated_gzip_names_the_last_line_read(tmp_path, chunk_lines, keep):
    text = "".join(line + "\n" for line in criteo_lines(2000, seed=3)).encode()
    broken = tmp_path / "day_0.tsv"
    last = truncated_gzip(broken, text, keep)
    assert (500 < last < 1500 and last % 64) if keep < 1 else last == 2000  # not at a chunk boundary
    with pytest.raises(DataError) as e:
        preprocess([broken], tmp_path / "out", chunk_lines=chunk_lines, workers=1, progress=False)
    assert str(e.value).startswith(f"{broken}: cannot read past line {last} (the last whole line read): ")
    assert "\n" not in str(e.value)


NO_TRAINING = ("{path}: no well-formed training rows to count the vocabulary on ({n} lines: {n} malformed, "
               "0 valid and 0 test rows); give training data, or reuse an earlier vocabulary with "
               "--vocab DIR")
ALL_MALFORMED = ["x", "y\tz", with_field("I3", "1.5")]
ALL_MALFORMED_REPORT = ("d.tsv: 3 malformed lines skipped: 2 wrong field count (lines 1, 2), "
                        "1 bad dense value in I3 (line 3)")


@pytest.mark.parametrize("lines,report", [([], None), (ALL_MALFORMED, ALL_MALFORMED_REPORT)])
def test_no_training_rows_names_the_file_and_still_reports_malformed_lines(tmp_path, capsys, lines, report):
    src = write_lines(tmp_path / "d.tsv", lines)
    with pytest.raises(DataError) as e:
        preprocess([src], tmp_path / "out", workers=1, progress=False)
    assert str(e.value) == NO_TRAINING.format(path=src, n=len(lines))
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "malformed lines skipped" in line] == ([report] if report else [])


def test_cli_no_training_rows_prints_the_report_then_one_line_error(tmp_path):
    src = write_lines(tmp_path / "d.tsv", ALL_MALFORMED)
    r = run_cli("--in", str(src), "--out", str(tmp_path / "out"), "--workers", "1")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-2:] == [ALL_MALFORMED_REPORT,
                                          "distrec: error: " + NO_TRAINING.format(path=src, n=3)]
