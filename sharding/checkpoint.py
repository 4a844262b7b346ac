"""Shard-level checkpoint state with global offsets, and loading it under another plan or world size.

    saved = export_shards(emb)                  # this rank's shards: weights + optimizer state
    import_shards(emb, saved_from_all_ranks)    # any plan, any world size: rows/cols are global

Each entry names its table and the global rows and columns it covers, so a loader fills each of its
shards from whichever saved pieces overlap it (resharding N -> M). Per-row optimizer state of a
column shard (row-wise Adagrad) is taken from the saved piece that covers the row.
"""
from __future__ import annotations

import torch

from sharding.optim import state_names
from sharding.runtime import ShardedEmbeddingCollection
from sharding.types import PlanError, Shard


def export_shards(emb: ShardedEmbeddingCollection) -> list[dict]:
    """This rank's shards and replicas: weights and optimizer state, each with its global rows and columns."""
    return [{"table": name, "rows": (s.row_start, s.row_end), "cols": (s.col_start, s.col_end),
             "weight": w.detach().clone(), "state": {k: v.detach().clone() for k, v in state.items()}}
            for name, s, w, state in emb.held_shards()]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _fill(name: str, s: Shard, target: dict[str, torch.Tensor], pieces: list[dict]) -> None:
    """Copy every saved piece's overlap with shard ``s`` into ``target`` (weight and state views)."""
    covered = torch.zeros(s.num_rows, s.width, dtype=torch.bool)
    for piece in (p for p in pieces if p["table"] == name):
        rows, cols = _overlap(piece["rows"], (s.row_start, s.row_end)), _overlap(piece["cols"], (s.col_start, s.col_end))
        if rows is None or cols is None:
            continue
        src_r = slice(rows[0] - piece["rows"][0], rows[1] - piece["rows"][0])
        src_c = slice(cols[0] - piece["cols"][0], cols[1] - piece["cols"][0])
        dst_r, dst_c = slice(rows[0] - s.row_start, rows[1] - s.row_start), slice(cols[0] - s.col_start, cols[1] - s.col_start)
        for key, view in target.items():
            saved = piece["weight"] if key == "weight" else piece["state"].get(key)
            if saved is None:
                continue
            if saved.dim() == 0:
                view.copy_(saved)
            elif saved.dim() == 1:
                view[dst_r] = saved[src_r]
            else:
                view[dst_r, dst_c] = saved[src_r, src_c]
        covered[dst_r, dst_c] = True
    if not bool(covered.all()):
        missing = (~covered).nonzero()[0].tolist()
        raise PlanError(f"checkpoint has no values for table {name} row {s.row_start + missing[0]}, "
                        f"column {s.col_start + missing[1]}")


def table_sizes(pieces: list[dict]) -> dict[str, tuple[int, int]]:
    """(rows, dim) of every table, as the pieces' global offsets cover it."""
    size: dict[str, tuple[int, int]] = {}
    for p in pieces:
        rows, dim = size.get(p["table"], (0, 0))
        size[p["table"]] = (max(rows, p["rows"][1]), max(dim, p["cols"][1]))
    return size


def whole_tables(pieces: list[dict], kind: str) -> list[dict]:
    """Every table in one piece (all rows and columns), optimizer state included."""
    return recut(pieces, [(name, Shard(0, 0, rows, 0, dim)) for name, (rows, dim) in table_sizes(pieces).items()],
                 kind)


@torch.no_grad()
def recut(pieces: list[dict], targets: list[tuple[str, Shard]], kind: str) -> list[dict]:
    """The same values cut along other shard boundaries: one piece per (table, shard) in ``targets``,
    weights in the dtype they were saved in (a half-precision table stays half), state in fp32.

    recut(saved, [("C1", Shard(0, 0, 1000, 0, 16))], "adagrad")   # C1 whole, for one process
    """
    dtypes = {p["table"]: p["weight"].dtype for p in pieces}
    out = []
    for name, s in targets:
        weight = torch.zeros(s.num_rows, s.width, dtype=dtypes.get(name, torch.float32))
        state = {}
        for key, rule in state_names(kind).items():
            state[key] = torch.tensor(0.0) if rule == "scalar" else (
                torch.zeros(s.num_rows) if rule == "row" else torch.zeros(s.num_rows, s.width))
        _fill(name, s, {"weight": weight, **state}, pieces)
        out.append({"table": name, "rows": (s.row_start, s.row_end), "cols": (s.col_start, s.col_end),
                    "weight": weight, "state": state})
    return out


@torch.no_grad()
def import_shards(emb: ShardedEmbeddingCollection, pieces: list[dict]) -> None:
    """Fill every shard held here from the saved pieces that overlap it (any plan, any world size)."""
    for name, s, w, state in emb.held_shards():
        _fill(name, s, {"weight": w, **state}, pieces)
