"""The resumable training state: where training stands, and what a checkpoint holds of it.

    common, own = training_state(model, embeddings, optimizers, pos, ctx, to_dict(cfg))   # to save
    pos = restore(open_latest("runs/ckpt"), model, embeddings, optimizers, ctx)        # any plan, any world
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distrec.trainer.checkpoint import Checkpoint, CheckpointError, agreed
from distrec.trainer.dist import DistContext
from sharding.checkpoint import export_shards, import_shards
from sharding.types import PlanError


@dataclass
class Position:
    """Where training stands: the next global batch to train is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict:
    """The random streams as tensors and plain data (checkpoints are read with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])


def check_shapes(ckpt: Checkpoint, model: nn.Module, embeddings) -> None:
    """A checkpoint of another model shape fails here, naming the parameter or table and both shapes."""
    saved = ckpt.common["dense"]
    for name, value in model.state_dict().items():
        if name.startswith("embeddings."):
            continue
        if name not in saved:
            raise CheckpointError(f"{ckpt.path}: has no {name} (the model has it, {tuple(value.shape)})")
        if tuple(saved[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{ckpt.path}: {name} is {tuple(saved[name].shape)} there, "
                                  f"{tuple(value.shape)} in this model")
    extra = [k for k in saved if k not in model.state_dict()]
    if extra:
        raise CheckpointError(f"{ckpt.path}: holds {extra[0]}, which this model does not have")
    sizes = {}
    for held in ckpt.index:
        for table, rows, cols in held:
            r, c = sizes.get(table, (0, 0))
            sizes[table] = (max(r, rows[1]), max(c, cols[1]))
    for t in embeddings.tables:
        if sizes.get(t.name, (t.num_rows, t.dim)) != (t.num_rows, t.dim):
            raise CheckpointError(f"{ckpt.path}: table {t.name} is {sizes[t.name][0]} x {sizes[t.name][1]} there, "
                                  f"{t.num_rows} x {t.dim} in this model")


def training_state(model: nn.Module, embeddings, optimizers, pos: Position, ctx: DistContext,
                   config: dict, schedule=None, scaler=None) -> tuple[dict | None, dict]:
    """(what rank 0 saves for all: dense model and optimizer, position, config; None on other ranks,
    what this rank saves: its embedding shards with their global rows and columns, and its RNG state).
    Shards carry global offsets, so the state loads under another plan or world size. ``schedule``
    (distrec.trainer.schedule.Schedule) adds what a plateau schedule has seen, ``scaler``
    (distrec.trainer.loss_scale.LossScale) fp16's loss scale."""
    own = {"shards": export_shards(embeddings), "rng": rng_state()}
    if not ctx.is_main:
        return None, own
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith("embeddings.")}
    common = {"dense": dense, "dense_optimizer": optimizers[0].state_dict(), "position": vars(pos).copy(),
              "world_size": ctx.world_size, "config": config}
    if schedule is not None:
        common["schedule"] = schedule.state_dict()
    if scaler is not None:
        common["loss_scale"] = scaler.state_dict()
    return common, own


def restore(ckpt: Checkpoint, model: nn.Module, embeddings, optimizers, ctx: DistContext,
            schedule=None, scaler=None) -> Position:
    """Load a checkpoint saved under any plan and world size; each rank reads only the rank files that
    hold rows of its own shards. The learning rates are not taken from it: the next
    ``schedule.apply`` sets the configured ones (times the schedule's factor)."""
    return agreed(ctx, _restore, ckpt, model, embeddings, optimizers, ctx.rank, schedule, scaler)


def _restore(ckpt: Checkpoint, model: nn.Module, embeddings, optimizers, rank: int, schedule=None,
             scaler=None) -> Position:
    check_shapes(ckpt, model, embeddings)
    common = ckpt.common
    model.load_state_dict(common["dense"], strict=False)  # strict=False: the embeddings load from shards
    optimizers[0].load_state_dict(common["dense_optimizer"])
    if schedule is not None:
        # Forget the lr applied before: the loaded state_dict brought the checkpoint's lr back.
        schedule.applied = None
        if "schedule" in common:  # checkpoints from before schedules have none: a fresh plateau
            schedule.load_state_dict(common["schedule"])
    if scaler is not None and "loss_scale" in common:  # else (an fp32 or bf16 run's checkpoint) a fresh scale
        scaler.load_state_dict(common["loss_scale"])
    wanted = [(name, (s.row_start, s.row_end), (s.col_start, s.col_end)) for name, s, _, _ in embeddings.held_shards()]
    try:
        import_shards(embeddings, ckpt.pieces(wanted))
    except PlanError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    # Same rank, same random stream as before the stop. A rank the checkpoint had not (a resharded
    # one, or more ranks than before) keeps the stream seeded from train.seed at start-up.
    rng = ckpt.rank_state(rank).get("rng") if rank < ckpt.world_size else None
    if rng is not None:
        set_rng_state(rng)
    return Position(**common["position"])
