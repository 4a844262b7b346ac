"""Rounding fp32 results to a half-precision table's storage: to nearest, or stochastically.

    w16 = round_to(w32, torch.float16, stochastic=True, salt=step)   # every kernel rounds like this

An update computed in fp32 and rounded to nearest is lost whenever it is smaller than half a unit in the
last place of the stored value (bf16 keeps 8 significant bits: a weight of 0.5 ignores any step below
0.002), so training with small learning rates stalls. Stochastic rounding rounds up with probability
equal to the distance from the lower neighbour, so the expected stored value is the fp32 result and small
updates survive on average (fbgemm's ``stochastic_rounding``, Gupta et al. 2015).

The random bits are not drawn from a generator: they are a hash of the fp32 value's bits and a salt (the
training step), so the reference and every kernel (C++, Triton) round the same value identically, a run
sharded over N ranks rounds exactly as one process does, and a resumed run as an uninterrupted one. The
rounding itself adds the low ``DROPPED_BITS`` random bits to the fp32 bit pattern and truncates them (sign
and magnitude: negative values round symmetrically). That is exact stochastic rounding for bf16, and for
fp16 for every value in fp16's normal range (above 6.1e-5 in magnitude); smaller values are then rounded
to nearest by the conversion (fp16 subnormals), larger than 65504 overflow to infinity as with nearest.
Non-finite values are converted as they are.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32 has 23 mantissa bits; bf16 keeps 7 and fp16 10, so the update drops 16 or 13 of them.
DROPPED_BITS = {torch.bfloat16: 16, torch.float16: 13}
MASK32 = 0xFFFFFFFF
# The hash (Chris Wellons' "lowbias32", a 32-bit integer mixer) and the golden-ratio salt spreader.
HASH_MUL1, HASH_MUL2, SALT_MUL = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def salt_key(salt: int) -> int:
    """The 32-bit key a salt (the step) is xor-ed into every value's bits with; the kernels take this."""
    return (int(salt) * SALT_MUL + 1) & MASK32


def hash32(bits: torch.Tensor, key: int) -> torch.Tensor:
    """lowbias32(bits ^ key) over int64 tensors holding unsigned 32-bit values (wrapping products)."""
    h = (bits ^ key) & MASK32
    h = h ^ (h >> 16)
    h = (h * HASH_MUL1) & MASK32
    h = h ^ (h >> 15)
    h = (h * HASH_MUL2) & MASK32
    return h ^ (h >> 16)


def round_to(x: torch.Tensor, dtype: torch.dtype, stochastic: bool = True, salt: int = 0) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``: fp32 as is, fp16/bf16 to nearest or stochastically (module docstring)."""
    if dtype == torch.float32:
        return x.float()
    if not stochastic:
        return x.to(dtype)
    x = x.float()
    dropped = DROPPED_BITS[dtype]
    bits = x.contiguous().view(torch.int32).to(torch.int64) & MASK32
    noise = hash32(bits, salt_key(salt)) & ((1 << dropped) - 1)
    truncated = ((bits + noise) & (MASK32 ^ ((1 << dropped) - 1)))
    # back to a signed 32-bit pattern, then to the float it encodes (exactly representable in ``dtype``)
    signed = torch.where(truncated >= 2**31, truncated - 2**32, truncated).to(torch.int32)
    rounded = signed.view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (fp32): the most one stochastic rounding of x to ``dtype`` moves it
    (nearest moves it at most half of this). Below ``dtype``'s smallest normal, the subnormal spacing."""
    info = torch.finfo(dtype)
    mag = x.abs().float().clamp_min(info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps
