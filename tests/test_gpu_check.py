"""benchmarks/gpu_check.sh --dry-run: every step of the one prepared GPU check runs on the CPU (tiny shapes,
Triton interpreted) and passes, and the report says so; the script that runs on a GPU is this one."""
import json
import os
import subprocess

from tests.conftest import REPO


def test_the_gpu_check_dry_run_passes_and_writes_its_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["versions"]["torch"]
    steps = {s["name"]: s for s in report["steps"]}
    assert all(s["ok"] for s in steps.values()), [s["detail"] for s in steps.values() if not s["ok"]]
    kernels = steps["Triton kernels vs the plain-PyTorch reference"]["data"]["checked"]
    assert len(kernels) == 4 * (3 + 4) + 2  # per optimizer: 3 fp32 batch kinds, 2 half dtypes x 2 roundings
    compared = steps["trainer on cpu vs CPU, same seed"]["data"]
    assert compared["kernel"] == "triton" and compared["tables_rel_diff"] <= 0.05
    assert steps["2 ranks sharing the cpu vs 1 rank on CPU"]["data"]["kernel"] == "triton"
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "## Steps" in markdown and "| impl | pooling | fwd ms |" in markdown and "FAILED" not in markdown
    assert "every correctness check passed" in r.stdout
