"""fbgemm_gpu's table-batched embedding op behind ``TableBatchedEmbedding``.

    tbe = FbgemmTBE([(1000, 16), (50, 8)], OptimSpec("rowwise_adagrad", lr=0.05))

On CPU this is the op from fbgemm-gpu-cpu (weights in host memory); on CUDA the one from fbgemm-gpu.
Its optimizer runs inside backward. The CPU op has no Adam and all ops need widths that are multiples
of 4, so ``unsupported`` says why a set of shapes cannot use it (the runtime then keeps the plain path).
Nor does it take ``OptimSpec.l2`` (``optimizer.sparse_l2``): fbgemm-gpu-cpu 1.8.0's CPU op accepts
``weight_decay`` with ``WeightDecayMode.L2`` and ignores it (measured: the rows move exactly as without it,
for EXACT_SGD, EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD), and its CUDA op supports L2 for row-wise Adagrad
only, so the L2 on touched rows runs on the torch or Triton kernels instead.
"""
from __future__ import annotations

import dataclasses

import torch

from sharding.kernels import TableBatchedEmbedding
from sharding.optim import OptimSpec, state_names

WIDTH_MULTIPLE = 4  # fbgemm's TBE kernels load rows in float4 vectors
_OPTIM_NAMES = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
                "adam": "ADAM"}


def available() -> bool:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a mismatched build fails with OSError (undefined symbol)
        return False
    return True


def unsupported(shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device) -> str | None:
    """Why these shapes or this optimizer cannot run on fbgemm's op here, or None if they can."""
    if not available():
        return "fbgemm_gpu is not importable"
    odd = [w for _, w in shapes if w % WIDTH_MULTIPLE]
    if odd:
        return f"fbgemm needs shard widths that are multiples of {WIDTH_MULTIPLE}, got width {odd[0]}"
    if optim.kind == "adam" and device.type == "cpu":
        return "fbgemm's CPU op has no Adam"
    if optim.l2:
        return "optimizer.sparse_l2 is not supported by kernel fbgemm (its op ignores or lacks L2 on rows)"
    return None


class FbgemmTBE(TableBatchedEmbedding):
    def __init__(self, shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device | str = "cpu"):
        super().__init__()
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            OptimType, SplitTableBatchedEmbeddingBagsCodegen)

        device = torch.device(device)
        why = unsupported(shapes, optim, device)
        if why:
            raise ValueError(why)
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        self.shapes, self.optim = list(shapes), optim
        self.op = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, width, location, compute) for rows, width in shapes],
            optimizer=getattr(OptimType, _OPTIM_NAMES[optim.kind]), learning_rate=optim.lr, eps=optim.eps,
            beta1=optim.betas[0], beta2=optim.betas[1], device=device)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(indices, offsets, per_sample_weights=per_sample_weights)

    def table_weights(self) -> list[torch.Tensor]:
        return self.op.split_embedding_weights()

    def set_lr(self, lr: float) -> None:
        self.op.set_learning_rate(lr)  # the op reads its lr tensor at each backward
        self.optim = dataclasses.replace(self.optim, lr=lr)

    def table_states(self) -> list[dict[str, torch.Tensor]]:
        names = list(state_names(self.optim.kind))
        if not names:
            return [{} for _ in self.shapes]
        per_state = self.op.split_optimizer_states()  # [tables][states] for fbgemm >= 1.0
        return [dict(zip(names, states)) for states in per_state]
