"""Table-batched embedding kernels: several tables pooled in one call, the optimizer fused into backward.

One interface (``TableBatchedEmbedding``), several implementations:

- ``sharding.kernels.cpu_tbe.CpuTBE``: distrec's own C++ CPU kernel (``csrc/cpu_tbe.cpp``, built by
  setup.py at install); the runtime's choice on CPU where it is built.
- ``sharding.kernels.fbgemm.FbgemmTBE``: fbgemm_gpu's SplitTableBatchedEmbeddingBagsCodegen (the CPU op
  from fbgemm-gpu-cpu, the CUDA op where fbgemm-gpu CUDA is installed); imported only when asked for.
- ``sharding.kernels.triton_tbe.TritonTBE``: distrec's own Triton kernels (GPU, or CPU under
  TRITON_INTERPRET=1).

The plain-PyTorch path (``F.embedding_bag`` + ``sharding.optim.SparseOptimizer``) is the reference every
implementation is tested against; ``sharding.lookup`` picks which one the runtime uses.
"""
from __future__ import annotations

import torch
from torch import nn

from sharding.optim import OptimSpec


class TableBatchedEmbedding(nn.Module):
    """T tables of shapes ``shapes`` [(rows, width)], looked up together; backward updates the rows.

        tbe = FbgemmTBE([(1000, 16), (50, 8)], OptimSpec("adagrad", lr=0.05))
        # B = 2 bags per table, table-major: table 0's bags, then table 1's.
        out = tbe(torch.tensor([3, 7, 9, 1]), torch.tensor([0, 2, 3, 3, 4]))   # [2, 24]
        out.sum().backward()      # rows 3, 7, 9 of table 0 and row 1 of table 1 are updated here

    ``forward(indices, offsets, per_sample_weights=None)``: ``indices`` int64 table-local row ids,
    ``offsets`` int64 of length T*B+1 (bag j of table t is indices[offsets[t*B+j]:offsets[t*B+j+1]]),
    optional float ``per_sample_weights`` aligned with ``indices``. Returns [B, sum of widths]: sum
    pooling, table t's columns after table t-1's. Backward combines the gradients of duplicate ids and
    applies ``optim`` in place to the touched rows only (lazy); it returns no weight gradient.

    Weights are stored in ``dtype`` (fp32, fp16 or bf16), optimizer state in fp32: an update is computed
    in fp32 from the stored weight and rounded back as ``sharding.rounding.round_to(new, dtype,
    stochastic_rounding, salt)`` does, bit for bit. ``salt`` is the rounding's salt for the next backward
    (it grows by one after each; the runtime sets it to the training step with ``set_salt``).
    """

    shapes: list[tuple[int, int]]
    optim: OptimSpec
    dtype: torch.dtype = torch.float32
    stochastic_rounding: bool = True
    salt: int = 0

    def __init__(self):
        super().__init__()
        # deferred (fp16 loss scaling, sharding.lookup.BatchedLookup): backward appends (grad, indices,
        # offsets, per_sample_weights) to ``pending`` instead of updating; the caller applies or drops it
        self.deferred, self.pending = False, []

    def set_salt(self, salt: int) -> None:
        """The stochastic rounding's salt for the next backward (the training step: a resumed or sharded
        run rounds exactly as an uninterrupted single-process one)."""
        self.salt = int(salt)

    def table_weights(self) -> list[torch.Tensor]:
        """Views [rows, width] of each table's weights (writable: checkpoints load through them)."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        """The learning rate of later backwards (a schedule changes it between steps); state is kept."""
        raise NotImplementedError

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        """Views of each table's optimizer state, keyed as ``sharding.optim.state_names(kind)``:
        "row_col" ones [rows, width], "row" ones [rows], "scalar" ones 0-dim."""
        raise NotImplementedError


def fused_lookup(tbe: TableBatchedEmbedding, indices: torch.Tensor, offsets: torch.Tensor,
                 per_sample_weights: torch.Tensor | None) -> torch.Tensor:
    """``tbe.pool`` (the forward kernel) as an autograd op whose backward is ``tbe.apply_gradient`` (the
    backward fused with the update: rows change in place, no gradient flows anywhere): the forward of
    distrec's own kernels, C++ and Triton, which both define the two methods.

        out = fused_lookup(self, indices, offsets, None)   # in CpuTBE.forward
    """
    # A leaf that wants a gradient, so autograd calls backward (which updates the rows) whenever the
    # output is used in a loss; it costs nothing and keeps the storage off the parameter list.
    anchor = torch.empty(0, device=indices.device, requires_grad=torch.is_grad_enabled())
    return _FusedLookup.apply(anchor, tbe, indices, offsets, per_sample_weights)


class _FusedLookup(torch.autograd.Function):
    """Forward pools; backward updates the rows in place and returns no gradient for anything."""

    @staticmethod
    def forward(ctx, anchor, tbe: TableBatchedEmbedding, indices, offsets, per_sample_weights):
        ctx.tbe = tbe
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return tbe.pool(indices, offsets, per_sample_weights)

    @staticmethod
    def backward(ctx, grad):
        indices, offsets, per_sample_weights = ctx.saved_tensors
        if ctx.tbe.deferred:
            ctx.tbe.pending.append((grad, indices, offsets, per_sample_weights))
        else:
            ctx.tbe.apply_gradient(grad, indices, offsets, per_sample_weights)
        return None, None, None, None, None
