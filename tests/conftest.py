"""Small configs and data sets for tests: a few tables, a few thousand rows, seconds to make."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distrec.config import load_config
from distrec.tools.data.synth import synthesize

REPO = Path(__file__).resolve().parents[1]

SMALL_TOML = """
[schema]
preset = "none"
dense = ["d1", "d2", "d3"]
categorical = ["c1", "c2", "c3", "c4"]

[tables]
dim = 8
cardinalities = [50, 200, 7, 300]
hotnesses = [1, 3, 1, 1]

[synth]
seed = 7
train_rows = 6000
eval_rows = 2000
rows_per_file = 2500
row_group_rows = 500

[optimizer]
dense_lr = 0.01
sparse_lr = 0.1

[model]
bottom_mlp = [16, 8]
top_mlp = [16]

[train]
global_batch_size = 256
progress_bar = false
log_every_steps = 1

[data]
prefetch_batches = 2
"""


def write_config(path: Path, text: str = SMALL_TOML) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, data folder) shared by the tests that only read the data."""
    root = tmp_path_factory.mktemp("small")
    cfg_path = write_config(root / "small.toml")
    synthesize(load_config(str(cfg_path)), root / "data")
    return cfg_path, root / "data"


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)
