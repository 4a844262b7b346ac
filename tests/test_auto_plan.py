"""plan.default = "auto" (the default): the trainer runs the cost-model planner for its ranks and device,
logs every table's choice and why, runs the plan ``distrec plan --json`` writes for the same inputs, and
fails on every rank with one line when the planner finds no plan."""
import json
import re

from tests.conftest import run_cli


def train(cfg_path, data, out, world, *extra):
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    return run_cli(*launch, "-m", "distrec.train", "--config", str(cfg_path), f"--data.path={data}",
                   f"--logging.dir={out}", "--train.max_steps=3", "--eval.max_rows=500", *extra)


def written_plan(cfg_path, data, path, world, *extra):
    r = run_cli("-m", "distrec", "plan", "--gpus", str(world), "--preset", "cpu", "--config", str(cfg_path),
                f"--data.path={data}", "--json", str(path), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(path.read_text())


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{table: (type, why)} from the planner's table in the trainer's log."""
    rows = re.finditer(r"^(c\d)\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+ [KMG]?B\s+(?:fp32|fp16|bf16)\s+(\w+)(?: x\d+)?\s+[\d,-]+\s+(\S.*?)\s{2,}", stdout, re.M)
    return {m.group(1): (m.group(2), m.group(3)) for m in rows}


def test_trainer_without_a_plan_setting_runs_the_plan_distrec_plan_writes(small_data, tmp_path):
    cfg_path, data = small_data
    r = train(cfg_path, data, tmp_path / "run", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'from the planner (plan.default = "auto", preset cpu' in r.stdout
    rows = table_rows(r.stdout)
    assert sorted(rows) == ["c1", "c2", "c3", "c4"], r.stdout
    assert all(why.startswith(("cost:", "memory:", "config:")) for _, why in rows.values()), rows
    ran = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert ran == written_plan(cfg_path, data, tmp_path / "plan.json", 2)
    assert {name: t["sharding_type"] for name, t in ran["tables"].items()} == {n: kind for n, (kind, _) in rows.items()}


def test_per_table_lists_fix_types_and_the_planner_places_the_rest(small_data, tmp_path):
    cfg_path, data = small_data
    pin = ['--plan.row_wise=["c4"]', '--plan.data_parallel=["c1"]']
    r = train(cfg_path, data, tmp_path / "run", 2, *pin)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = table_rows(r.stdout)
    assert rows["c4"][0] == "row_wise" and rows["c4"][1].startswith("config: only row_wise"), rows
    assert rows["c1"][0] == "data_parallel", rows
    ran = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert ran == written_plan(cfg_path, data, tmp_path / "plan.json", 2, *pin)


def test_explicit_placement_and_plan_file_still_win(small_data, tmp_path):
    cfg_path, data = small_data
    r = train(cfg_path, data, tmp_path / "rw", 1, "--plan.default=row_wise")
    assert r.returncode == 0 and "built-in placement, plan.default = 'row_wise'" in r.stdout, r.stderr[-2000:]
    ran = json.loads((tmp_path / "rw" / "plan.json").read_text())
    assert {t["sharding_type"] for t in ran["tables"].values()} == {"row_wise"}
    # The kept plan pins a later run: --plan takes the file, whatever the planner would choose now.
    r = train(cfg_path, data, tmp_path / "again", 1, "--plan", str(tmp_path / "rw" / "plan.json"))
    assert r.returncode == 0 and f"plan file {tmp_path / 'rw' / 'plan.json'}" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "plan.json").read_text()) == ran


def test_no_plan_is_one_line_on_every_rank(small_data, tmp_path):
    cfg_path, data = small_data
    r = train(cfg_path, data, tmp_path / "run", 2, "--planner.reserve_gb=100000")
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("distrec.train: error:")]
    assert sorted(ln.split("]")[0] for ln in errors) == ["distrec.train: error: [rank 0", "distrec.train: error: [rank 1"]
    assert all('the planner (plan.default = "auto", preset cpu, 2 ranks) found no plan: no plan fits 2 ranks' in ln
               for ln in errors), errors
    # torchrun's agent reports the failed children with its own traceback; the ranks' own is one line each
    assert "distrec/" not in r.stderr.replace(str(tmp_path), "") and "sharding/" not in r.stderr


def test_a_list_contradicting_allowed_types_names_the_table(small_data, tmp_path):
    cfg_path, data = small_data
    r = train(cfg_path, data, tmp_path / "run", 1, '--plan.row_wise=["c4"]', '--planner.allowed_types={c4=["table_wise"]}')
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith(
        "table c4 is listed in plan.row_wise but planner.allowed_types gives it only table_wise"), r.stderr
