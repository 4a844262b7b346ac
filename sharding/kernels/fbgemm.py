"""fbgemm_gpu's table-batched embedding op behind ``TableBatchedEmbedding``.

    tbe = FbgemmTBE([(1000, 16), (50, 8)], OptimSpec("rowwise_adagrad", lr=0.05))

On CPU this is the op from fbgemm-gpu-cpu (weights in host memory); on CUDA the one from fbgemm-gpu.
Its optimizer runs inside backward. The CPU op has no Adam and all ops need widths that are multiples
of 4, so ``unsupported`` says why a set of shapes cannot use it (the runtime then keeps the plain path).
Nor does it take ``OptimSpec.l2`` (``optimizer.sparse_l2``): fbgemm-gpu-cpu 1.8.0's CPU op accepts
``weight_decay`` with ``WeightDecayMode.L2`` and ignores it (measured: the rows move exactly as without it,
for EXACT_SGD, EXACT_ADAGRAD and EXACT_ROWWISE_ADAGRAD), and its CUDA op supports L2 for row-wise Adagrad
only, so the L2 on touched rows runs on the torch or Triton kernels instead.

Weights are stored in ``dtype`` (fbgemm's ``weights_precision``; its optimizer state stays fp32) and the
output is fp32. Its rounding of an update is its own (``stochastic_rounding`` draws fbgemm's random bits,
not ``sharding.rounding``'s hash), so its rows do not match distrec's kernels bit for bit.
fbgemm-gpu-cpu 1.8.0's CPU op (measured, tests/test_fbgemm_half.py): fp16 weights round to nearest, its
SGD and Adagrad rounding the update to fp16 before adding it (within an ulp of the new value plus one of
the update of the fp32 op's rows; row-wise Adagrad within half an ulp); it ignores ``stochastic_rounding``
(SGD steps of 0.1 ulp never move a row); it has no bf16 weights (its forward is not implemented for
BFloat16). So on CPU ``unsupported`` refuses bf16, and fp16 unless ``stochastic_rounding`` is off (the
runtime then falls back to a kernel that rounds as asked). The CUDA op is given both, with stochastic
rounding, as fbgemm documents them (not measured here: no CUDA build of fbgemm_gpu on this machine).
"""
from __future__ import annotations

import dataclasses

import torch

from sharding.kernels import TableBatchedEmbedding
from sharding.optim import OptimSpec, state_names

WIDTH_MULTIPLE = 4  # fbgemm's TBE kernels load rows in float4 vectors
_PRECISIONS = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16"}  # SparseType names
_OPTIM_NAMES = {"sgd": "EXACT_SGD", "adagrad": "EXACT_ADAGRAD", "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
                "adam": "ADAM"}


def available() -> bool:
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a mismatched build fails with OSError (undefined symbol)
        return False
    return True


def unsupported(shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device,
                dtype: torch.dtype = torch.float32, stochastic_rounding: bool = True) -> str | None:
    """Why these shapes, this optimizer or this storage cannot run on fbgemm's op here, or None if they can."""
    if dtype not in _PRECISIONS:
        return f"fbgemm stores fp32, fp16 or bf16 weights, not {dtype}"
    if not available():
        return "fbgemm_gpu is not importable"
    odd = [w for _, w in shapes if w % WIDTH_MULTIPLE]
    if odd:
        return f"fbgemm needs shard widths that are multiples of {WIDTH_MULTIPLE}, got width {odd[0]}"
    if optim.kind == "adam" and device.type == "cpu":
        return "fbgemm's CPU op has no Adam"
    if optim.l2:
        return "optimizer.sparse_l2 is not supported by kernel fbgemm (its op ignores or lacks L2 on rows)"
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "fbgemm's CPU op has no bf16 weights (its forward is not implemented for BFloat16)"
    if device.type == "cpu" and dtype == torch.float16 and stochastic_rounding:
        return "fbgemm's CPU op ignores stochastic_rounding for fp16 weights (sub-ulp updates are lost)"
    return None


class FbgemmTBE(TableBatchedEmbedding):
    """fbgemm's op over ``shapes``, weights in ``dtype`` rounded by fbgemm (``stochastic_rounding`` or to
    nearest; module docstring); ``salt`` is kept for the interface and unused (fbgemm draws its own bits)."""

    def __init__(self, shapes: list[tuple[int, int]], optim: OptimSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, stochastic_rounding: bool = True):
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import ComputeDevice, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            OptimType, SplitTableBatchedEmbeddingBagsCodegen)

        device = torch.device(device)
        why = unsupported(shapes, optim, device, dtype, stochastic_rounding)
        if why:
            raise ValueError(why)
        on_gpu = device.type == "cuda"
        location = EmbeddingLocation.DEVICE if on_gpu else EmbeddingLocation.HOST
        compute = ComputeDevice.CUDA if on_gpu else ComputeDevice.CPU
        self.shapes, self.optim = list(shapes), optim
        self.dtype, self.stochastic_rounding = dtype, bool(stochastic_rounding)
        self.op = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, width, location, compute) for rows, width in shapes],
            optimizer=getattr(OptimType, _OPTIM_NAMES[optim.kind]), learning_rate=optim.lr, eps=optim.eps,
            beta1=optim.betas[0], beta2=optim.betas[1], device=device,
            weights_precision=getattr(SparseType, _PRECISIONS[dtype]), stochastic_rounding=stochastic_rounding)

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
