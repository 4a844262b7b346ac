"""What this machine does with ``train.precision = "bf16"``: the CPU's bf16 instructions (``distrec
doctor`` shows them, the trainer logs them and warns when bf16 would be emulated).

    precision_note("bf16", "cpu")   # ("precision: bf16 autocast ...; this CPU has amx_bf16, avx512_bf16", "")

No torch here: ``distrec doctor`` reads it when torch itself may not load.
"""
from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags that make bf16 matmuls native: AMX tiles, AVX512-BF16 dot products (fp16: AVX512-FP16)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
HALF_FLAGS = (*BF16_FLAGS, "avx512_fp16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def half_line(flags: set[str]) -> str:
    """``distrec doctor``'s row: which half-precision instructions the CPU has."""
    have = [f for f in HALF_FLAGS if f in flags]
    if any(f in flags for f in BF16_FLAGS):
        return f"{', '.join(have)} (train.precision = \"bf16\" runs natively)"
    return "none of " + ", ".join(HALF_FLAGS) + " (bf16 autocast is emulated here: slower than fp32)"


def precision_note(precision: str, device_type: str, flags: set[str] | None = None) -> tuple[str, str]:
    """(the log line, a warning or "") for the trainer's precision on a ``device_type`` ("cpu", "cuda")."""
    if precision == "fp32":
        return "precision: fp32", ""
    what = "precision: bf16 autocast over the bottom MLP, the interaction and the top MLP (tables, their " \
           "exchanges, optimizer state and the loss in fp32)"
    if device_type != "cpu":
        return what, ""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return f"{what}; this CPU has {', '.join(have)}", ""
    return what, ("train.precision = \"bf16\" on a CPU without " + " or ".join(BF16_FLAGS)
                  + ": bf16 is emulated and runs slower than fp32")
