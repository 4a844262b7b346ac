"""Pipelined input: batch i+1's ids are exchanged while batch i trains.

    for batch in pipelined(loader.epoch(0), model.embeddings):     # PipelinedBatch, in loader order
        train_step(ddp_model, model.embeddings, optimizers, batch, global_size)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from distrec.data.loader import Batch
from sharding.runtime import InputDist


@dataclass
class PipelinedBatch:
    """A batch whose ids are already on their way to their shards (``ShardedEmbeddingCollection``'s
    ``start_input_dist``); the model takes ``sparse`` as it takes a JaggedBatch."""

    dense: torch.Tensor
    sparse: InputDist
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def input_wait_s(self) -> float:
        """How long the lookup waited for the ids: about 0 when the exchange was hidden."""
        return self.sparse.wait_s


def pipelining(cfg, world_size: int) -> bool:
    """Whether batches are pipelined: ``train.pipeline``, and more than one rank (on one the exchanges
    are the identity: nothing would be hidden).

        if pipelining(cfg, ctx.world_size): batches = pipelined(batches, model.embeddings)
    """
    return cfg.train.pipeline and world_size > 1


def pipelined(batches: Iterator[Batch], embeddings) -> Iterator[PipelinedBatch]:
    """Batch i+1's ids travel to their shards while batch i trains (what TorchRec's
    TrainPipelineSparseDist does). Every rank starts the same exchanges in the same order, so results
    equal the unpipelined loop."""
    current = None
    for batch in batches:
        upcoming = PipelinedBatch(batch.dense, embeddings.start_input_dist(batch.sparse), batch.labels)
        if current is not None:
            yield current
        current = upcoming
    if current is not None:
        yield current
