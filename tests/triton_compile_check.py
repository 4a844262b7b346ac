"""Compile the Triton TBE kernels for an H100 (sm_90) on a machine without a GPU.

    python tests/triton_compile_check.py

Triton's interpreter runs the kernels as Python, so it accepts things the compiler rejects (a global
that is not a tl.constexpr, say). This runs the real compiler, front end to cubin (Triton ships ptxas),
on the variants that use every branch; it needs a process without TRITON_INTERPRET=1. Prints one line
per kernel and "compiled" at the end.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding.kernels import triton_kernels as K  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
IDS = dict(weight_offsets="*i64", col_offsets="*i64", indices="*i64", offsets="*i64", bag_of="*i32",
           order="*i64", row_offsets="*i64", run_starts="*i64", piece_first="*i64", piece_starts="*i64",
           piece_ends="*i64")
FLOATS = dict(per_sample_weights="*fp32", out="*fp32", grad="*fp32", partials="*fp32", state1="*fp32",
              state2="*fp32", row_state="*fp32", step_size="*fp32", lr="fp32", eps="fp32",
              one_minus_beta1="fp32", one_minus_beta2="fp32", l2="fp32")
INTS = dict(num_bags="i32", batch_size="i32", out_row_stride="i32", num_runs="i32", long_run="i32",
            grad_row_stride="i32", salt_key="i32")


def compile_kernel(kernel, weights: str, constexprs: dict) -> int:
    """Compile one variant; returns the cubin's size in bytes."""
    types = {**IDS, **FLOATS, **INTS, "weights": weights}
    signature = {n: "constexpr" if n in constexprs else types[n] for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=H100,
                              options={"num_warps": 8})
    return len(compiled.asm["cubin"])


def main() -> None:
    assert not K.INTERPRETED, "run without TRITON_INTERPRET=1: this checks the compiler, not the interpreter"
    every = dict(HAS_WEIGHTS=True, MEAN=True)
    convert = dict(ROUNDING=K.ROUNDING_CODES["convert"], DROPPED_BITS=0)
    stochastic = {torch.float16: dict(ROUNDING=K.ROUNDING_CODES["stochastic"], DROPPED_BITS=13),
                  torch.bfloat16: dict(ROUNDING=K.ROUNDING_CODES["stochastic"], DROPPED_BITS=16)}
    variants = [
        (K.pool_bags, "*bf16", dict(every, BAGS=4, BLOCK_IDS=8, BLOCK_COLS=128)),
        (K.pool_bags, "*fp32", dict(HAS_WEIGHTS=False, MEAN=False, BAGS=32, BLOCK_IDS=1, BLOCK_COLS=128)),
        (K.sum_run_pieces, "*fp32", dict(every, BLOCK_IDS=32, BLOCK_COLS=128)),
        (K.update_rows, "*fp32", dict(convert, HAS_WEIGHTS=False, MEAN=False, OPTIM=K.OPTIM_CODES["sgd"],
                                      L2=False, RUNS=32, BLOCK_COLS=128)),
        (K.update_rows, "*fp32", dict(convert, HAS_WEIGHTS=False, MEAN=False, OPTIM=K.OPTIM_CODES["adagrad"],
                                      L2=True, RUNS=32, BLOCK_COLS=128)),
        (K.update_rows, "*fp16", dict(every, **convert, OPTIM=K.OPTIM_CODES["rowwise_adagrad"], L2=True,
                                      RUNS=32, BLOCK_COLS=128)),
        (K.update_rows, "*bf16", dict(every, **convert, OPTIM=K.OPTIM_CODES["adam"], L2=False, RUNS=8,
                                      BLOCK_COLS=512)),
        # the stochastic rounding (hash, carry, truncation; bf16 stored from the high half)
        (K.update_rows, "*fp16", dict(every, **stochastic[torch.float16], OPTIM=K.OPTIM_CODES["sgd"], L2=False,
                                      RUNS=32, BLOCK_COLS=128)),
        (K.update_rows, "*bf16", dict(every, **stochastic[torch.bfloat16], OPTIM=K.OPTIM_CODES["adagrad"],
                                      L2=True, RUNS=32, BLOCK_COLS=128)),
    ]
    for kernel, weights, constexprs in variants:
        size = compile_kernel(kernel, weights, constexprs)
        print(f"{kernel.__name__} {weights} {constexprs}: {size} B cubin", flush=True)
    print("compiled")


if __name__ == "__main__":
    main()
