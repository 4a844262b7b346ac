"""What this machine does with ``train.precision = "bf16"``: the CPU's bf16 instructions (``distrec
doctor`` shows them, the trainer logs them and warns when bf16 would be emulated).

    precision_note("bf16", "cpu")   # ("precision: bf16 autocast ...; this CPU has amx_bf16, avx512_bf16", "")

No torch here: ``distrec doctor`` reads it when torch itself may not load.
"""
from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags that make bf16 matmuls native: AMX tiles, AVX512-BF16 dot products (fp16: AVX512-FP16)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
HALF_FLAGS = (*BF16_FLAGS, "avx512_fp16", "amx_fp16")


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
    what = f"precision: {precision} autocast over the bottom MLP, the interaction and the top MLP (dense " \
           "weights, optimizer state and the loss in fp32)"
    if device_type != "cpu":
        return what, ""
    flags = cpu_flags() if flags is None else flags
    if precision == "fp16":
        # Measured on a Xeon with AVX512-FP16 but no AMX-FP16: fp16 matmuls at fp32's speed, bf16's 3.6x faster.
        return what + "; dynamic loss scaling", ("" if "amx_fp16" in flags else
                                                  "train.precision = \"fp16\" on a CPU without amx_fp16 runs "
                                                  "about as fast as fp32; bf16 is the fast half type on CPUs")
    have = [f for f in BF16_FLAGS if f in flags]
    if have:
        return f"{what}; this CPU has {', '.join(have)}", ""
    return what, ("train.precision = \"bf16\" on a CPU without " + " or ".join(BF16_FLAGS)
                  + ": bf16 is emulated and runs slower than fp32")


def storage_note(table_precisions: dict[str, str], stochastic: bool, comm: tuple[str, str], dense_comm: str) -> str:
    """The log line for the embeddings' precisions: ``table_precisions`` {table: fp32 | fp16 | bf16}.

        storage_note({"C1": "fp16"}, True, ("bf16", "fp32"), "fp32")
        # "tables: fp16 (C1), updates rounded stochastically; pooled vectors exchanged in bf16, ..."
    """
    by: dict[str, list[str]] = {}
    for name, precision in table_precisions.items():
        by.setdefault(precision, []).append(name)
    listed = "; ".join(f"{p} ({', '.join(names) if len(by) > 1 else 'all'})" for p, names in sorted(by.items()))
    half = any(p != "fp32" for p in by)
    rounding = (", updates rounded stochastically" if stochastic else ", updates rounded to nearest") if half else ""
    return (f"tables: {listed}{rounding} (data-parallel replicas and optimizer state in fp32); pooled vectors "
            f"exchanged in {comm[0]}, their gradients in {comm[1]}; dense gradients all-reduced in {dense_comm}")
