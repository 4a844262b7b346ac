"""``distrec doctor``: what is installed, whether it goes together, and what this machine offers.

    >>> check_versions("2.13.0+cpu", "1.9.0", None)
    ['fbgemm-gpu 1.9 does not load on torch 2.13 (undefined symbol); pip install -c constraints.txt fbgemm-gpu-cpu==1.8.0']

``main()`` prints one line per item and returns 0 when the installed set is fine (fbgemm-gpu, torchrec
and horovod are optional: the core needs torch only) and 1 when a known-bad combination is found or an
installed package fails to load.
"""
from __future__ import annotations

import importlib.metadata as metadata
import platform
import re
import signal
import subprocess
import sys

from distrec import __version__
from distrec.trainer.precision import cpu_flags, half_line

# (torch, fbgemm-gpu, torchrec) minors published and tested together, with the builds they exist for.
# 2.13/1.8/1.8: our constraints.txt (CPU, `make test`), and the torchrec 1.8.0 release promotion
#   (pytorch/test-infra#8517: torch==2.13.0, fbgemm-gpu==1.8.0, CUDA 12.6 and 13.0).
# 2.8/1.3/1.3: FBGEMM v1.3.0 release notes (PyTorch 2.8; CUDA 12.6, 12.8, 12.9) and
#   meta-pytorch/torchrec#3313 (torchrec 1.3.0 for torch 2.8.0 + fbgemm-gpu 1.3.0).
KNOWN_GOOD = (
    ("2.13", "1.8", "1.8", "cpu, cu126, cu130"),
    ("2.8", "1.3", "1.3", "cpu, cu126, cu128, cu129"),
)

# Each fbgemm-gpu release is built against one torch minor: on a newer torch it fails to load with an
# undefined symbol (meta-pytorch/torchrec#4337 saw 1.6 on 2.12), and an older torch is unsupported.
# From the FBGEMM release compatibility table (0.4-1.5), torchrec's v1.6.0 release cut (1.6 -> 2.11)
# and pytorch/test-infra (1.7 -> 2.12, 1.8 -> 2.13).
FBGEMM_TORCH = {
    "0.4": "2.0", "0.5": "2.1", "0.6": "2.2", "0.7": "2.3", "0.8": "2.4",
    "1.0": "2.5", "1.1": "2.6", "1.2": "2.7", "1.3": "2.8", "1.4": "2.9", "1.5": "2.10",
    "1.6": "2.11", "1.7": "2.12", "1.8": "2.13",
}

# Pairings known to fail, with the exact fix (constraints.txt records the first). Keyed by
# (torch minor, fbgemm minor, fbgemm build); other mismatches get a message made from FBGEMM_TORCH.
KNOWN_BAD = {
    ("2.13", "1.9", "cpu"): "fbgemm-gpu 1.9 does not load on torch 2.13 (undefined symbol); "
                            "pip install -c constraints.txt fbgemm-gpu-cpu==1.8.0",
    ("2.13", "1.9", "cuda"): "fbgemm-gpu 1.9 does not load on torch 2.13 (undefined symbol); "
                             "pip install fbgemm-gpu==1.8.0 "
                             "--index-url https://download.pytorch.org/whl/cu126",
}

FBGEMM_DISTS = ("fbgemm-gpu", "fbgemm-gpu-cpu")
IMPORT_TIMEOUT_S = 300


def minor(version: str | None) -> str | None:
    """``"2.13.0+cu126"`` -> ``"2.13"``; None for None or a version without a major.minor."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return f"{m[1]}.{m[2]}" if m else None


def local_tag(version: str | None) -> str:
    """``"2.13.0+cu126"`` -> ``"cu126"``; ``""`` without a ``+tag``."""
    return (version or "").partition("+")[2]


def fbgemm_build(dist: str, version: str) -> str:
    """cpu, cuda or rocm. PyPI's plain ``fbgemm-gpu`` is the CUDA build; the PyTorch index tags it."""
    tag = local_tag(version)
    if dist == "fbgemm-gpu-cpu" or tag == "cpu":
        return "cpu"
    return "rocm" if tag.startswith("rocm") else "cuda"


def expected_torch(fbgemm_minor: str) -> str | None:
    """The torch minor an fbgemm-gpu minor is built for: the table, else the 1.X -> 2.(X+5) rule
    that torchrec's release scripts use (validate_binaries.sh, meta-pytorch/torchrec#4337)."""
    if fbgemm_minor in FBGEMM_TORCH:
        return FBGEMM_TORCH[fbgemm_minor]
    major, _, rest = fbgemm_minor.partition(".")
    return f"2.{int(rest) + 5}" if major == "1" else None


def _fbgemm_fix(torch_minor: str, build: str) -> str:
    want = next((f for f, t in FBGEMM_TORCH.items() if t == torch_minor), None)
    if want is None:
        return "install the fbgemm-gpu release built for this torch"
    if build == "cpu":
        return f"pip install fbgemm-gpu-cpu=={want}.0"
    return f"pip install fbgemm-gpu=={want}.0 --index-url https://download.pytorch.org/whl/<cuXXX of torch>"


def _check_torch_fbgemm(torch_v: str, fbgemm_v: str, build: str) -> list[str]:
    t, f = minor(torch_v), minor(fbgemm_v)
    if t is None or f is None:
        return []  # nightlies (date versions) and source builds: nothing to compare against
    if (t, f, build) in KNOWN_BAD:
        return [KNOWN_BAD[(t, f, build)]]
    want = expected_torch(f)
    if want is None or want == t:
        return []
    return [f"fbgemm-gpu {f} is built for torch {want}, not torch {t}, and is not expected to load "
            f"(undefined symbol); {_fbgemm_fix(t, build)}"]


def _check_torchrec(fbgemm_v: str | None, torchrec_v: str) -> list[str]:
    r, f = minor(torchrec_v), minor(fbgemm_v)
    if fbgemm_v is None:
        return [f"torchrec {r} is installed without fbgemm-gpu, which it imports; "
                f"pip install -c constraints.txt fbgemm-gpu-cpu (or the CUDA fbgemm-gpu {r})"]
    if r and f and r != f:
        return [f"torchrec {r} is released with fbgemm-gpu {r}, not {f}; "
                "install the two at the same minor version"]
    return []


def _check_build(torch_v: str, fbgemm_v: str, build: str, gpus: int | None) -> list[str]:
    t_tag, f_tag = local_tag(torch_v), local_tag(fbgemm_v)
    if build == "cuda" and gpus == 0:
        return ["the CUDA build of fbgemm-gpu is installed but this machine has no GPU (it needs the "
                "CUDA driver to load); on a CPU machine: pip uninstall -y fbgemm-gpu && "
                + _fbgemm_fix(minor(torch_v) or "", "cpu")]
    if build == "cuda" and t_tag == "cpu":
        return [f"fbgemm-gpu {fbgemm_v} is a CUDA build but torch {torch_v} is CPU-only; "
                "install the CUDA torch from the same download.pytorch.org/whl/cuXXX index"]
    if t_tag.startswith("cu") and f_tag.startswith("cu") and t_tag != f_tag:
        return [f"torch is built for {t_tag} but fbgemm-gpu for {f_tag}; take both from one "
                f"download.pytorch.org/whl/{t_tag} index"]
    return []


def check_versions(torch_v: str, fbgemm_v: str | None, torchrec_v: str | None, *,
                   fbgemm_dist: str = "fbgemm-gpu-cpu", gpus: int | None = None) -> list[str]:
    """Problems with this set of installed versions (None: not installed); [] when it is fine.

    ``fbgemm_dist`` is the distribution that provides ``fbgemm_gpu`` (``fbgemm-gpu`` is the CUDA
    build on PyPI); ``gpus`` is the number of GPUs seen, None when unknown.
    """
    problems = []
    if fbgemm_v is not None:
        build = fbgemm_build(fbgemm_dist, fbgemm_v)
        problems += _check_torch_fbgemm(torch_v, fbgemm_v, build)
        problems += _check_build(torch_v, fbgemm_v, build, gpus)
    if torchrec_v is not None:
        problems += _check_torchrec(fbgemm_v, torchrec_v)
    return problems


def check_fbgemm_dists(installed: list[str]) -> list[str]:
    """Both fbgemm distributions write the same ``fbgemm_gpu`` package; whichever came last wins."""
    if len(installed) < 2:
        return []
    return [f"both {' and '.join(installed)} are installed and overwrite each other's fbgemm_gpu; "
            "pip uninstall -y fbgemm-gpu fbgemm-gpu-cpu, then install the one for this machine"]


def describe_set(torch_v: str, fbgemm_v: str | None, torchrec_v: str | None) -> str:
    """Which KNOWN_GOOD row the installed set belongs to; absent optional packages match any row."""
    if fbgemm_v is None and torchrec_v is None:
        return "torch only (fbgemm-gpu and torchrec are optional)"
    got = (minor(torch_v), minor(fbgemm_v), minor(torchrec_v))
    for row in KNOWN_GOOD:
        if all(g is None or g == want for g, want in zip(got, row)):
            t, f, r, builds = row
            return f"known good: torch {t} + fbgemm-gpu {f} + torchrec {r} ({builds})"
    return "not in the known-good table"


def installed_version(dist: str) -> str | None:
    """The version pip recorded, which is there even when the package's import is broken."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# Run in a child interpreter: a mis-paired extension can abort the process rather than raise, and the
# doctor must survive to report it. One child for all modules, because each pays for importing torch.
_IMPORT_CHILD = """
import sys
for name in sys.argv[1:]:
    print("start", name, flush=True)
    try:
        __import__(name)
    except BaseException as e:
        print("fail", name, f"{type(e).__name__}: {e}".replace("\\n", " "), flush=True)
    else:
        print("ok", name, flush=True)
"""


def _import_in_child(modules: list[str]) -> dict[str, str | None]:
    """Results for the modules the child got to: None (imports) or a one-line reason."""
    cmd = [sys.executable, "-c", _IMPORT_CHILD, *modules]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S)
        out, died = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, died = e.stdout or "", None
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
    results, current = {}, None
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        name, _, reason = rest.partition(" ")
        if word == "start":
            current = name
        elif word in ("ok", "fail"):
            results[name], current = (None if word == "ok" else reason[:300]), None
    if current is not None:  # it never finished this one
        results[current] = (f"import did not finish in {IMPORT_TIMEOUT_S} s" if died is None
                            else f"the interpreter died: {_exit_reason(died)}")
    elif not results:
        results = {m: f"the import check did not run: {_exit_reason(died)}" for m in modules}
    return results


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return f"exit status {code}"


def try_imports(modules: list[str]) -> dict[str, str | None]:
    """``{module: None}`` when it imports, else ``{module: one-line reason}``."""
    results: dict[str, str | None] = {}
    while pending := [m for m in modules if m not in results]:
        results.update(_import_in_child(pending))  # each round settles at least the first pending
    return results


def _package_line(version: str | None, error: str | None) -> str:
    if version is None:
        return "not installed"
    return f"{version} (imports)" if error is None else f"{version}, fails to load: {error}"


def _backends(dist) -> str:
    if not dist.is_available():
        return "none (torch.distributed is not available in this build)"
    names = ("gloo", "nccl", "mpi", "ucc")
    have = [n for n in names if getattr(dist, f"is_{n}_available", lambda: False)()]
    missing = [n for n in names if n not in have]
    return f"{', '.join(have) or 'none'} (unavailable: {', '.join(missing) or 'none'})"


def _gpus(torch) -> tuple[int, str]:
    try:
        count = torch.cuda.device_count()
        names = [f"{torch.cuda.get_device_name(i)} ({gpu_half(*torch.cuda.get_device_capability(i))})"
                 for i in range(count)]
    except Exception as e:  # a broken driver raises from here; report it as no GPU
        return 0, f"0 ({type(e).__name__}: {e})"
    return count, f"{count}" + (f": {', '.join(names)}" if names else "")


def gpu_half(major: int, minor: int) -> str:
    """What a GPU of compute capability major.minor does in half precision: ``gpu_half(9, 0)``."""
    # Tensor Cores take fp16 from sm_70 (Volta) and bf16 from sm_80 (Ampere); before that half is emulated.
    kinds = [k for k, since in (("fp16", 7), ("bf16", 8)) if major >= since]
    return f"sm_{major}{minor}: " + (f"{' and '.join(kinds)} tensor cores" if kinds else "no half-precision tensor cores")


def _row(label: str, text: str) -> None:
    print(f"{label:<12} {text}")


def _torch_build(torch) -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU"


def _installed(fbgemm_dists: list[str]) -> dict[str, str | None]:
    """Versions of the optional packages, keyed by the module that must import."""
    return {"fbgemm_gpu": installed_version(fbgemm_dists[-1]) if fbgemm_dists else None,
            "torchrec": installed_version("torchrec"),
            "horovod.torch": installed_version("horovod")}


def _load_torch():
    """The torch module, or None after printing why it does not load."""
    try:
        import torch
        import torch.distributed  # noqa: F401  (main reads torch.distributed)
    except Exception as e:  # the core dependency: nothing else can be checked without it
        version = installed_version("torch") or "not installed"
        _row("torch", f"{version}, fails to load: {type(e).__name__}: {e}")
        return None
    return torch


def _report_packages(versions: dict[str, str | None], fbgemm_dists: list[str]) -> dict[str, str | None]:
    """Print a row per optional package; return the import failures, {module: reason or None}."""
    errors = try_imports([m for m, v in versions.items() if v is not None])
    fbgemm_label = f"{fbgemm_dists[-1]} " if fbgemm_dists else ""
    for label, module, prefix in (("fbgemm_gpu", "fbgemm_gpu", fbgemm_label),
                                  ("torchrec", "torchrec", ""), ("horovod", "horovod.torch", "")):
        line = _package_line(versions[module], errors.get(module))
        _row(label, prefix + line if versions[module] else line)
    return errors


CPU_KERNEL = "sharding.kernels._cpu_tbe"  # distrec's own C++ CPU kernel, built by setup.py at install


def cpu_kernel_line(found: bool, error: str | None) -> tuple[str, list[str]]:
    """The row for distrec's CPU kernel and its problems: not built is no problem (the runtime falls back
    to fbgemm's op or plain PyTorch and logs why), built but failing to load is one.

        >>> cpu_kernel_line(False, None)[0]
        'not built (optional; `make install` or `python setup.py build_ext --inplace` builds it)'
    """
    hint = "`make install` or `python setup.py build_ext --inplace`"
    if not found:
        return f"not built (optional; {hint} builds it)", []
    if error is not None:
        return f"built, fails to load: {error}", [f"distrec's CPU kernel fails to load: {error}; rebuild it with {hint}"]
    return "built (imports; --plan.kernel=auto uses it on CPU)", []


def _report_cpu_kernel() -> list[str]:
    import importlib.util

    found = importlib.util.find_spec(CPU_KERNEL) is not None
    error = try_imports([CPU_KERNEL])[CPU_KERNEL] if found else None
    line, problems = cpu_kernel_line(found, error)
    _row("cpu kernel", line)
    return problems


def main() -> int:
    _row("distrec", __version__)
    _row("python", f"{platform.python_version()} ({sys.executable})")
    torch = _load_torch()
    if torch is None:
        return 1
    torch_v = installed_version("torch") or torch.__version__
    _row("torch", f"{torch_v} ({_torch_build(torch)} build)")
    fbgemm_dists = [d for d in FBGEMM_DISTS if installed_version(d) is not None]
    versions = _installed(fbgemm_dists)
    errors = _report_packages(versions, fbgemm_dists)
    kernel_problems = _report_cpu_kernel()
    _row("backends", _backends(torch.distributed))
    gpus, gpu_text = _gpus(torch)
    _row("gpus", gpu_text)
    _row("cpu half", half_line(cpu_flags()))

    fbgemm_v, torchrec_v = versions["fbgemm_gpu"], versions["torchrec"]
    problems = check_versions(torch_v, fbgemm_v, torchrec_v, gpus=gpus,
                              fbgemm_dist=fbgemm_dists[-1] if fbgemm_dists else "fbgemm-gpu-cpu")
    problems += check_fbgemm_dists(fbgemm_dists)
    problems += [f"{m} fails to load: {e}" for m, e in errors.items() if e is not None]
    problems += kernel_problems
    _row("version set", describe_set(torch_v, fbgemm_v, torchrec_v))
    for p in problems:
        _row("problem", p)
    _row("status", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0
