"""The machine and software versions a report was measured on.

    machine()   # {"cpu": "AMD EPYC ...", "cores": 2, "memory_gb": 24.7, "gpus": [], "hostname": ...}
"""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def machine() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gb": round(memory_gb(), 1), "gpus": gpus,
            "os": platform.platform(), "python": platform.python_version(), "git": git_revision()}


def versions() -> dict:
    out = {}
    for name in ("distrec", "torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec", "horovod", "triton", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
