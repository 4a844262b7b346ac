"""The trained DLRM as one inference model: whole tables, the dense part and the interaction, taking plain
tensors, scriptable (TorchScript) and exportable (ONNX) with any batch size.

    model = InferenceDLRM.from_checkpoint(load_latest("runs/demo/ckpt"))   # any training plan, any world size
    probs = model(dense, lengths, ids)   # dense [B, D] fp32, lengths [B, T] int64, ids int64 (sample-major)

Inputs are sample-major so that requests concatenate into a batch (Triton's dynamic batcher): ``lengths[b,
t]`` ids of table t for sample b, and ``ids`` holds sample 0's ids of table 0, then of table 1, ..., then
sample 1's. ``sample_major(batch)`` turns the loader's table-major JaggedBatch into that. An id outside its
table gets, by ``missing_ids``: "zero", a zero row (the table's missing-id row: every table carries one
extra zero row at its end); "error" (TorchScript only: ONNX has no way to raise), a RuntimeError naming the
table. Either way no lookup ever reads outside a table.
"""
from __future__ import annotations

import torch
from torch import nn

from distrec.config import config_from_dict, table_specs
from distrec.model.dlrm import DLRM
from sharding.checkpoint import whole_tables
from sharding.jagged import JaggedBatch

MISSING_IDS = ("zero", "error")


class WholeTables(nn.Module):
    """The tables for DLRM.from_config to size the dense part by (``dims``); never looked up itself."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = list(dims)


class InferenceDLRM(nn.Module):
    def __init__(self, model: DLRM, tables: list[torch.Tensor], names: list[str], mean: list[bool],
                 missing_ids: str = "zero"):
        super().__init__()
        if missing_ids not in MISSING_IDS:
            raise ValueError(f"missing_ids must be one of {MISSING_IDS}, got {missing_ids!r}")
        self.bottom, self.interaction, self.top, self.fm = model.bottom, model.interaction, model.top, model.fm
        self.dim, self.names, self.raise_on_missing = model.dim, list(names), missing_ids == "error"
        self.rows = [int(t.shape[0]) for t in tables]
        self.dims = [int(t.shape[1]) for t in tables]
        # One flat buffer, each table followed by its zero missing-id row: id -> base + id, or base + rows.
        base = [0]
        for r, d in zip(self.rows, self.dims):
            base.append(base[-1] + (r + 1) * d)
        flat = torch.cat([torch.cat([t.float(), t.new_zeros(1, t.shape[1]).float()]).reshape(-1) for t in tables])
        self.register_buffer("weights", flat)
        self.register_buffer("starts", torch.tensor(base[:-1], dtype=torch.int64))
        self.register_buffer("row_counts", torch.tensor(self.rows, dtype=torch.int64))
        self.mean = [bool(m) for m in mean]  # a list, not a tensor: ONNX export traces no data-dependent branch

    @staticmethod
    def from_checkpoint(state: dict, where: str = "checkpoint", missing_ids: str = "zero") -> "InferenceDLRM":
        """From a checkpoint's full state (``distrec.trainer.checkpoint.load_latest``), saved on any plan;
        ``where`` names it in config errors."""
        cfg = config_from_dict(state["config"], where)
        whole = {p["table"]: p["weight"] for p in whole_tables(state["shards"], cfg.optimizer.sparse)}
        specs = table_specs(cfg, {name: w.shape[0] for name, w in whole.items()})
        model = DLRM.from_config(cfg, WholeTables([s.dim for s in specs]))
        missing, unexpected = model.load_state_dict(state["dense"], strict=False)  # the tables come from shards
        if missing or unexpected:  # not silently half a model: the config and the weights disagree
            raise ValueError(f"{where}: the dense weights do not fit the model of its config (missing "
                             f"{(missing or ['none'])[0]}, unexpected {(unexpected or ['none'])[0]})")
        return InferenceDLRM(model.eval(), [whole[s.name] for s in specs], [s.name for s in specs],
                             [s.pooling == "mean" for s in specs], missing_ids).eval()

    def pooled(self, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, sum of dims]: each (sample, table) bag's rows summed (or averaged), tables side by side."""
        batch, tables = lengths.shape[0], lengths.shape[1]
        bag = torch.repeat_interleave(torch.arange(batch * tables, device=ids.device), lengths.reshape(-1))
        table = bag % tables
        rows = self.row_counts[table]
        ok = (ids >= 0) & (ids < rows)
        if self.raise_on_missing and not bool(ok.all()):
            bad = int(torch.nonzero(~ok)[0][0])
            raise RuntimeError(f"id {int(ids[bad])} is out of range for table {self.names[int(table[bad])]} "
                               f"with {int(rows[bad])} rows")
        row = torch.where(ok, ids, rows)  # the missing-id row
        out = []
        for t, d in enumerate(self.dims):  # one gather and one segment sum per table (dims may differ)
            mine = table == t
            at = self.starts[t] + row[mine] * d
            values = self.weights[at.unsqueeze(1) + torch.arange(d, device=ids.device)]
            sums = torch.zeros(batch, d, device=ids.device).index_add(0, bag[mine] // tables, values)
            if self.mean[t]:
                sums = sums / lengths[:, t].clamp(min=1).unsqueeze(1).to(sums.dtype)
            out.append(sums)
        return torch.cat(out, dim=1)

    def forward(self, dense: torch.Tensor, lengths: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Click probabilities [B]."""
        pooled = self.pooled(lengths, ids)
        bottom = self.bottom(dense) if self.bottom is not None else None
        logit = self.top(self.interaction(bottom, pooled, self.dim)).squeeze(1)
        if self.fm is not None:
            logit = logit + self.fm(pooled, self.dim)
        return torch.sigmoid(logit)


def sample_major(batch: JaggedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [B, T], ids sample-major) of a loader batch, whose values are table-major."""
    tables, size = len(batch.keys), batch.batch_size
    lengths = batch.lengths.view(tables, size)
    starts = torch.cumsum(batch.lengths, 0) - batch.lengths  # each table-major bag's first id
    order = torch.arange(tables * size).view(tables, size).t().reshape(-1)  # bags sample by sample
    counts = batch.lengths[order]
    first = torch.repeat_interleave(starts[order] - (torch.cumsum(counts, 0) - counts), counts)
    ids = batch.values[first + torch.arange(int(counts.sum()))]
    return lengths.t().contiguous(), ids
