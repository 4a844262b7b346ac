"""Tolerances from the arithmetic, not from one CPU.

    atol = sum_tol(n * max_abs_term, n)        # two float32 sums of the same n terms in other orders

Two implementations that add the same float32 terms in another order (other kernels, ranks, threads, SIMD
widths: AMD and AVX-512 Intel CPUs differ) each lie within (n - 1) * u * sum|x| of the exact sum, u = EPS32 / 2
the unit roundoff, whatever the order; so they differ by at most (n - 1) * EPS32 * sum|x|, to first order.
A product formed before the sum (a weight times a row) adds u per term on each side: n * EPS32 * sum|x|
in all. C = 2 doubles that for the second-order terms and an elementwise op or two after the sum (a
divide, a square root), so the bound does not depend on the machine or the thread count.
"""
from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps
C = 2.0


def sum_tol(values_abs_sum, n_terms: int):
    """The absolute tolerance of a float32 sum of ``n_terms`` terms whose magnitudes add up to
    ``values_abs_sum`` (a number, or a tensor for one bound per element)."""
    return C * n_terms * EPS32 * values_abs_sum


def assert_within(got: torch.Tensor, want: torch.Tensor, tol, what: str) -> None:
    """|got - want| <= tol everywhere (``tol`` a number or a tensor of per-element bounds)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    over = (got.double() - want.double()).abs() - torch.as_tensor(tol, dtype=torch.float64)
    worst = int(over.argmax()) if over.numel() else 0
    assert over.numel() == 0 or float(over.reshape(-1)[worst]) <= 0, (
        f"{what}: element {worst} differs by {float((got - want).abs().reshape(-1)[worst]):.3g}, "
        f"allowed {float(torch.as_tensor(tol).expand_as(got).reshape(-1)[worst]):.3g}")
