"""`distrec doctor` and `distrec --version`: the version-set rules on fake versions, then the real command."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

from distrec.tools.doctor import check_fbgemm_dists, check_versions, cpu_kernel_line, describe_set, expected_torch

ROOT = Path(__file__).resolve().parents[1]
FIX_19 = "pip install -c constraints.txt fbgemm-gpu-cpu==1.8.0"


def run_distrec(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrec", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_known_good_cpu_set_has_no_problems():
    assert check_versions("2.13.0+cpu", "1.8.0", "1.8.0", fbgemm_dist="fbgemm-gpu-cpu", gpus=0) == []
    assert describe_set("2.13.0+cpu", "1.8.0", "1.8.0").startswith("known good: torch 2.13")


def test_known_good_cuda_set_has_no_problems():
    assert check_versions("2.13.0+cu126", "1.8.0+cu126", "1.8.0", fbgemm_dist="fbgemm-gpu", gpus=8) == []
    assert check_versions("2.8.0+cu126", "1.3.0+cu126", "1.3.0", fbgemm_dist="fbgemm-gpu", gpus=1) == []


def test_fbgemm_19_on_torch_213_names_the_fix():
    problems = check_versions("2.13.0+cpu", "1.9.0", "1.8.0", fbgemm_dist="fbgemm-gpu-cpu", gpus=0)
    assert any("fbgemm-gpu 1.9 does not load on torch 2.13" in p and p.endswith(FIX_19) for p in problems)
    # torchrec 1.8 with fbgemm 1.9 is a second, separate problem
    assert any(p.startswith("torchrec 1.8 is released with fbgemm-gpu 1.8, not 1.9") for p in problems)


def test_other_torch_fbgemm_mismatch_is_a_problem():
    # the pairing torchrec's own CI saw crash: torch 2.12 with fbgemm-gpu 1.6 (built for 2.11)
    [problem] = check_versions("2.12.0+cpu", "1.6.0", None, gpus=0)
    assert "fbgemm-gpu 1.6 is built for torch 2.11, not torch 2.12" in problem
    assert problem.endswith("pip install fbgemm-gpu-cpu==1.7.0")


def test_fbgemm_to_torch_rule_past_the_table():
    assert expected_torch("1.8") == "2.13"
    assert expected_torch("1.9") == "2.14"
    assert expected_torch("0.8") == "2.4"
    assert expected_torch("0.3") is None


def test_absent_optional_packages_are_fine():
    assert check_versions("2.13.0+cpu", None, None, gpus=0) == []
    assert check_versions("2.5.1", None, None) == []
    assert describe_set("2.13.0+cpu", None, None).startswith("torch only")


def test_torchrec_without_fbgemm_is_a_problem():
    [problem] = check_versions("2.13.0+cpu", None, "1.8.0", gpus=0)
    assert problem.startswith("torchrec 1.8 is installed without fbgemm-gpu")


def test_cuda_fbgemm_without_a_gpu_is_named():
    [problem] = check_versions("2.13.0+cu126", "1.8.0+cu126", "1.8.0", fbgemm_dist="fbgemm-gpu", gpus=0)
    assert "CUDA build of fbgemm-gpu is installed but this machine has no GPU" in problem
    assert "pip uninstall -y fbgemm-gpu" in problem
    # PyPI's untagged fbgemm-gpu is the CUDA build too
    assert check_versions("2.13.0", "1.8.0", None, fbgemm_dist="fbgemm-gpu", gpus=0)
    # the CPU build from the PyTorch index is tagged +cpu and is fine without a GPU
    assert check_versions("2.13.0+cpu", "1.8.0+cpu", None, fbgemm_dist="fbgemm-gpu", gpus=0) == []


def test_cuda_tag_mismatch_and_cpu_torch_with_cuda_fbgemm():
    [problem] = check_versions("2.13.0+cu130", "1.8.0+cu126", None, fbgemm_dist="fbgemm-gpu", gpus=1)
    assert "torch is built for cu130 but fbgemm-gpu for cu126" in problem
    [problem] = check_versions("2.13.0+cpu", "1.8.0+cu126", None, fbgemm_dist="fbgemm-gpu", gpus=1)
    assert "CPU-only" in problem


def test_both_fbgemm_distributions_installed():
    assert check_fbgemm_dists(["fbgemm-gpu-cpu"]) == []
    [problem] = check_fbgemm_dists(["fbgemm-gpu", "fbgemm-gpu-cpu"])
    assert "overwrite each other" in problem


def test_doctor_command_passes_here():
    proc = run_distrec("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert importlib.metadata.version("torch") in proc.stdout
    assert re.search(r"^backends\s+.*\bgloo\b", proc.stdout, re.M), proc.stdout
    assert re.search(r"^status\s+ok$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^cpu kernel\s+built \(imports", proc.stdout, re.M), proc.stdout  # tests need it built


def test_cpu_kernel_row_says_whether_it_is_built_and_why_not():
    line, problems = cpu_kernel_line(False, None)
    assert line.startswith("not built (optional") and "make install" in line and problems == []
    line, problems = cpu_kernel_line(True, "ImportError: _cpu_tbe.so: undefined symbol: _ZN3c10")
    assert line == "built, fails to load: ImportError: _cpu_tbe.so: undefined symbol: _ZN3c10"
    assert len(problems) == 1 and "rebuild it with `make install`" in problems[0]
    assert cpu_kernel_line(True, None) == ("built (imports; --plan.kernel=auto uses it on CPU)", [])


def _fake_package(root: Path, dist: str, version: str, module: str, body: str) -> None:
    """A package whose metadata says `version` and whose import runs `body`, shadowing the real one."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    path = root.joinpath(*module.split("."))
    path.mkdir(parents=True)
    (path / "__init__.py").write_text(body)


def test_doctor_reports_broken_imports_and_exits_1(tmp_path):
    _fake_package(tmp_path, "fbgemm-gpu-cpu", "1.9.0", "fbgemm_gpu",
                  "raise OSError('fbgemm_gpu_py.so: undefined symbol: _ZN3c1010Warning')\n")
    _fake_package(tmp_path, "horovod", "0.28.1", "horovod.torch", "import os\nos.abort()\n")
    (tmp_path / "horovod" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = run_distrec("doctor", env=env)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "fbgemm-gpu-cpu 1.9.0, fails to load: OSError: fbgemm_gpu_py.so: undefined symbol" in out
    assert FIX_19 in out
    assert re.search(r"^horovod\s+0\.28\.1, fails to load: the interpreter died: SIGABRT", out, re.M), out
    assert re.search(r"^torchrec\s+1\.8\.0, fails to load: OSError", out, re.M), out


def test_version_flag_prints_the_package_version():
    source = (ROOT / "distrec" / "__init__.py").read_text()
    version = re.search(r'^__version__ = "([^"]+)"', source, re.M)[1]
    proc = run_distrec("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"distrec {version}"


def test_gpu_half_precision_follows_the_compute_capability():
    from distrec.tools.doctor import gpu_half

    assert gpu_half(9, 0) == "sm_90: fp16 and bf16 tensor cores"  # H100, H200
    assert gpu_half(7, 0) == "sm_70: fp16 tensor cores"  # V100: no bf16
    assert gpu_half(6, 1) == "sm_61: no half-precision tensor cores"
