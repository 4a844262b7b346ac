"""Criteo-shaped synthetic data from a hidden teacher model, with a known Bayes-optimal AUC.

    manifest = synthesize(load_config("configs/demo.toml"), "runs/demo/data")
    manifest["bayes_auc"]   # AUC of the teacher's true click probabilities on the held-out split

Ids per table follow a Zipf law (exponent and cardinality per table). The teacher is random
embeddings plus a one-hidden-layer MLP; its logit is scaled and shifted so that the click rate and the
Bayes AUC hit ``synth.target_ctr`` and ``synth.target_auc``. Every file is a pure function of the seed,
the split and the file index, so output is deterministic per seed and files can be made in any order.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distrec.config import Config, TableSpec, table_specs
from distrec.data.manifest import read_manifest, write_manifest
from distrec.trainer.metrics import auc, expected_auc

CALIBRATION_ROWS = 200_000
SPLIT_STREAMS = {"calibration": 0, "train": 1, "valid": 2}
_PRIMES = (1_000_003, 2_147_483_647, 4_294_967_291, 999_999_937)


def zipf_ids(rng: np.random.Generator, n: int, num_rows: int, exponent: float) -> np.ndarray:
    """Ids in [0, num_rows) with P(rank k) ~ k^-exponent, by inverting a bounded power-law CDF
    (O(1) memory, so 1e8-row tables are as cheap as small ones)."""
    u = rng.random(n)
    top = num_rows + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = np.power(top, u)
    else:
        x = np.power(1.0 + u * (top ** (1.0 - exponent) - 1.0), 1.0 / (1.0 - exponent))
    ranks = np.minimum(np.floor(x).astype(np.int64) - 1, num_rows - 1)
    return _scatter(ranks, num_rows)


def _scatter(ranks: np.ndarray, num_rows: int) -> np.ndarray:
    """Spread popular ranks over the id space (real ids are not sorted by popularity), bijectively."""
    prime = next(p for p in _PRIMES if math.gcd(p, num_rows) == 1)
    return (ranks * (prime % num_rows) + num_rows // 3) % num_rows


@dataclass
class Teacher:
    dense_w: np.ndarray  # [num_dense, hidden]
    tables: list[np.ndarray]  # per table [teacher rows, teacher_dim]
    proj: list[np.ndarray]  # per table [teacher_dim, hidden]
    bias: np.ndarray  # [hidden]
    out_w: np.ndarray  # [hidden]
    dense_mu: np.ndarray  # lognormal parameters of the raw dense counts
    dense_sigma: np.ndarray
    dense_missing: np.ndarray  # probability a dense value is missing
    raw_mean: float = 0.0
    raw_std: float = 1.0
    scale: float = 1.0  # logit = scale * standardised raw score + shift
    shift: float = 0.0


def make_teacher(cfg: Config, specs: list[TableSpec]) -> Teacher:
    s = cfg.synth
    rng = np.random.default_rng([s.seed, 99])
    nd, h, k = len(cfg.schema.dense), s.teacher_hidden, s.teacher_dim
    # Scale so that every feature, dense or categorical, contributes about equally to each hidden unit.
    fan_in = max(nd + len(specs), 1)
    return Teacher(
        dense_w=rng.normal(0, 1 / math.sqrt(fan_in), (nd, h)).astype(np.float32),
        tables=[rng.normal(0, 1, (min(t.num_rows, s.teacher_table_rows), k)).astype(np.float32) for t in specs],
        proj=[rng.normal(0, 1 / math.sqrt(k * fan_in), (k, h)).astype(np.float32) for _ in specs],
        bias=rng.normal(0, 0.5, h).astype(np.float32),
        out_w=rng.normal(0, 1, h).astype(np.float32),
        dense_mu=rng.uniform(0.0, 3.0, nd), dense_sigma=rng.uniform(0.5, 1.5, nd),
        dense_missing=rng.uniform(0.0, 0.3, nd),
    )


def _sample_features(rng: np.random.Generator, teacher: Teacher, specs: list[TableSpec], n: int):
    nd = teacher.dense_mu.size
    counts = np.floor(rng.lognormal(teacher.dense_mu, teacher.dense_sigma, (n, nd)))
    counts[rng.random((n, nd)) < teacher.dense_missing] = 0.0  # missing -> 0, as Criteo preprocessing does
    dense = np.log1p(counts).astype(np.float32)
    cats = []
    for t in specs:
        lengths = np.ones(n, np.int64) if t.hotness == 1 else rng.integers(1, t.hotness + 1, n)
        ids = zipf_ids(rng, int(lengths.sum()), t.num_rows, t.zipf_exponent)
        cats.append((ids, lengths))
    return dense, cats


def _raw_score(teacher: Teacher, dense: np.ndarray, cats) -> np.ndarray:
    pre = dense @ teacher.dense_w + teacher.bias
    for (ids, lengths), table, proj in zip(cats, teacher.tables, teacher.proj):
        emb = table[ids % table.shape[0]]
        if lengths.size != ids.size:  # multi-hot: mean of the bag's embeddings
            starts = np.r_[0, np.cumsum(lengths)[:-1]]
            emb = np.add.reduceat(emb, starts, axis=0) / lengths[:, None]
        pre += emb @ proj
    return np.tanh(pre) @ teacher.out_w


def click_probability(teacher: Teacher, dense: np.ndarray, cats) -> np.ndarray:
    z = (_raw_score(teacher, dense, cats) - teacher.raw_mean) / teacher.raw_std
    return _sigmoid(teacher.scale * z + teacher.shift)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|, unlike 1 / (1 + exp(-x))


def _shift_for_ctr(z: np.ndarray, scale: float, ctr: float) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(_sigmoid(scale * z + mid)) < ctr else (lo, mid)
    return (lo + hi) / 2


def calibrate(teacher: Teacher, cfg: Config, specs: list[TableSpec]) -> None:
    """Pick scale and shift so that the click rate and the expected Bayes AUC hit their targets."""
    rng = np.random.default_rng([cfg.synth.seed, SPLIT_STREAMS["calibration"]])
    raw = _raw_score(teacher, *_sample_features(rng, teacher, specs, CALIBRATION_ROWS))
    teacher.raw_mean, teacher.raw_std = float(raw.mean()), float(raw.std() + 1e-12)
    z = (raw - teacher.raw_mean) / teacher.raw_std
    lo, hi = 0.0, 50.0
    for _ in range(40):
        scale = (lo + hi) / 2
        shift = _shift_for_ctr(z, scale, cfg.synth.target_ctr)
        got = expected_auc(_sigmoid(scale * z + shift), z)
        lo, hi = (scale, hi) if got < cfg.synth.target_auc else (lo, scale)
    teacher.scale = (lo + hi) / 2
    teacher.shift = _shift_for_ctr(z, teacher.scale, cfg.synth.target_ctr)


def _table(cfg: Config, specs, dense, cats, labels) -> pa.Table:
    cols = {cfg.schema.label: pa.array(labels.astype(np.float32))}
    for i, name in enumerate(cfg.schema.dense):
        cols[name] = pa.array(dense[:, i])
    for t, (ids, lengths) in zip(specs, cats):
        if t.hotness == 1:
            cols[t.name] = pa.array(ids)
        else:
            offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
            cols[t.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
    return pa.table(cols)


def _write_file(cfg, specs, teacher, out: Path, split: str, index: int, rows: int) -> np.ndarray:
    """Make and write one file; returns the true click probabilities and labels, [2, rows]."""
    rng = np.random.default_rng([cfg.synth.seed, SPLIT_STREAMS[split], index])
    dense, cats = _sample_features(rng, teacher, specs, rows)
    probs = click_probability(teacher, dense, cats)
    labels = (rng.random(rows) < probs).astype(np.float32)
    path = out / split / f"part-{index:05d}.parquet"
    pq.write_table(_table(cfg, specs, dense, cats, labels), path, row_group_size=cfg.synth.row_group_rows)
    return np.stack([probs, labels])


def _file_rows(total: int, per_file: int) -> list[int]:
    return [min(per_file, total - start) for start in range(0, total, per_file)]


def synthesize(cfg: Config, out_dir: str | Path, workers: int = 2) -> dict:
    out = Path(out_dir)
    specs = table_specs(cfg)
    teacher = make_teacher(cfg, specs)
    calibrate(teacher, cfg, specs)
    splits, held_out = {}, None
    for split, total in (("train", cfg.synth.train_rows), ("valid", cfg.synth.eval_rows)):
        (out / split).mkdir(parents=True, exist_ok=True)
        sizes = _file_rows(total, cfg.synth.rows_per_file)
        # numpy and Parquet encoding release the GIL, so threads use both cores.
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda a: _write_file(cfg, specs, teacher, out, split, *a), enumerate(sizes)))
        splits[split] = {"rows": total, "files": [f"{split}/part-{i:05d}.parquet" for i in range(len(sizes))]}
        if split == "valid":
            held_out = np.concatenate(parts, axis=1) if parts else np.zeros((2, 0))
    manifest = {
        "kind": "synthetic",
        "seed": cfg.synth.seed,
        "schema": {"label": cfg.schema.label, "dense": cfg.schema.dense, "categorical": cfg.schema.categorical},
        "cardinalities": {t.name: t.num_rows for t in specs},
        "hotness": {t.name: t.hotness for t in specs},
        "zipf_exponents": {t.name: t.zipf_exponent for t in specs},
        "splits": splits,
        "teacher": {"dim": cfg.synth.teacher_dim, "hidden": cfg.synth.teacher_hidden,
                    "target_auc": cfg.synth.target_auc, "target_ctr": cfg.synth.target_ctr},
        "bayes_auc": auc(held_out[0], held_out[1]),
        "click_rate": float(held_out[1].mean()) if held_out.size else float("nan"),
    }
    write_manifest(out, manifest)
    return read_manifest(out)
