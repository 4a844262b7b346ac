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

from distrec.trainer.checkpoint import Checkpoint
from distrec.trainer.dist import DistContext
from sharding.checkpoint import export_shards, import_shards


@dataclass
class Position:
    """Where training stands: the next global batch to train is ``batch`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def training_state(model: nn.Module, embeddings, optimizers, pos: Position, ctx: DistContext,
                   config: dict) -> tuple[dict | None, dict]:
    """(what rank 0 saves for all: dense model and optimizer, position, config; None on other ranks,
    what this rank saves: its embedding shards with their global rows and columns, and its RNG state).
    Shards carry global offsets, so the state loads under another plan or world size."""
    own = {"shards": export_shards(embeddings), "rng": rng_state()}
    if not ctx.is_main:
        return None, own
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith("embeddings.")}
    return {"dense": dense, "dense_optimizer": optimizers[0].state_dict(), "position": vars(pos).copy(),
            "world_size": ctx.world_size, "config": config}, own


def restore(ckpt: Checkpoint, model: nn.Module, embeddings, optimizers, ctx: DistContext) -> Position:
    """Load a checkpoint saved under any plan and world size; each rank reads only the rank files that
    hold rows of its own shards."""
    common = ckpt.common
    missing, unexpected = model.load_state_dict(common["dense"], strict=False)
    if unexpected or any(not k.startswith("embeddings.") for k in missing):
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
    optimizers[0].load_state_dict(common["dense_optimizer"])
    wanted = [(name, (s.row_start, s.row_end), (s.col_start, s.col_end)) for name, s, _, _ in embeddings.held_shards()]
    import_shards(embeddings, ckpt.pieces(wanted))
    if ctx.rank < ckpt.world_size:  # same rank, same random stream as before the stop
        set_rng_state(ckpt.rank_state(ctx.rank)["rng"])
    return Position(**common["position"])
