"""A minimal jagged batch of categorical features, laid out like torchrec's KeyedJaggedTensor.

    jb = JaggedBatch.from_dense(["C1", "C2"], torch.tensor([[3, 7], [1, 0]]))
    jb.lengths   # tensor([1, 1, 1, 1]): key-major, one length per (key, sample)
    jb.values    # tensor([3, 1, 7, 0]): C1's ids for samples 0 and 1, then C2's

Convertible to and from a ``KeyedJaggedTensor`` when torchrec is installed; nothing here needs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class JaggedBatch:
    keys: list[str]
    values: torch.Tensor  # int64 ids, all keys' bags concatenated, key-major
    lengths: torch.Tensor  # int64 [len(keys) * batch_size]: ids per (key, sample)
    weights: torch.Tensor | None = None  # float per id (per-sample weights), same shape as values
    origin: str = ""  # where the rows came from (a loader sets e.g. "FILE row group 2"), for error messages

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() // max(len(self.keys), 1)

    def offsets(self) -> torch.Tensor:
        """Exclusive prefix sum of lengths, with the total appended: [len(lengths) + 1]."""
        return torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths, 0)])

    def length_per_key(self) -> list[int]:
        return self.lengths.view(len(self.keys), -1).sum(1).tolist()

    def first_out_of_range(self, num_rows: list[int]) -> tuple[int, int] | None:
        """(key index, id) of the first id < 0 or >= its key's table rows, else None: checked before a
        lookup, whose own index error would name neither the table nor the id."""
        for i, (ids, rows) in enumerate(zip(torch.split(self.values, self.length_per_key()), num_rows)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
                return i, int(ids[(ids < 0) | (ids >= rows)][0])
        return None

    def per_key(self) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor] | None]:
        """(each key's ids, lengths as [keys, batch], each key's weights or None)."""
        split = self.length_per_key()
        weights = list(torch.split(self.weights, split)) if self.weights is not None else None
        return list(torch.split(self.values, split)), self.lengths.view(len(self.keys), -1), weights

    def to(self, device: torch.device | str) -> "JaggedBatch":
        w = None if self.weights is None else self.weights.to(device, non_blocking=True)
        return JaggedBatch(self.keys, self.values.to(device, non_blocking=True),
                           self.lengths.to(device, non_blocking=True), w, self.origin)

    @staticmethod
    def from_dense(keys: list[str], ids: torch.Tensor) -> "JaggedBatch":
        """One id per (sample, key): ``ids`` is [batch, len(keys)]."""
        lengths = torch.ones(ids.numel(), dtype=torch.int64)
        return JaggedBatch(list(keys), ids.t().reshape(-1).to(torch.int64), lengths)

    @staticmethod
    def from_per_key(keys: list[str], values: list[torch.Tensor], lengths: list[torch.Tensor],
                     origin: str = "") -> "JaggedBatch":
        return JaggedBatch(list(keys), torch.cat(values).to(torch.int64), torch.cat(lengths).to(torch.int64),
                           origin=origin)

    def to_kjt(self):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        return KeyedJaggedTensor(keys=self.keys, values=self.values, lengths=self.lengths,
                                 weights=self.weights)

    @staticmethod
    def from_kjt(kjt) -> "JaggedBatch":
        return JaggedBatch(list(kjt.keys()), kjt.values(), kjt.lengths().to(torch.int64), kjt.weights_or_none())
