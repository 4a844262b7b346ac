"""Checkpoint pieces re-cut along other shard boundaries, offline and through `distrec reshard`."""
import pytest
import torch

from distrec.train import main as train_main
from distrec.trainer.checkpoint import load_latest, open_latest
from sharding.checkpoint import recut
from sharding.planner import simple_plan
from sharding.types import PlanError, Shard, TableConfig
from tests.conftest import run_cli

TABLES = [TableConfig("a", 10, 4), TableConfig("b", 7, 6)]


def whole(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"table": t.name, "rows": (0, t.num_rows), "cols": (0, t.dim),
             "weight": torch.randn(t.num_rows, t.dim, generator=g),
             "state": {"sum": torch.rand(t.num_rows, t.dim, generator=g)}} for t in TABLES]


def targets(world, kind):
    plan = simple_plan(TABLES, world, kind)
    return [(t.name, s) for t in TABLES for s in plan.tables[t.name].shards]


@pytest.mark.parametrize("path", [[(3, "row_wise"), (2, "column_wise")], [(4, "column_wise"), (3, "row_wise")]])
def test_recut_round_trip_keeps_weights_and_state(path):
    pieces = whole()
    for world, kind in path:
        pieces = recut(pieces, targets(world, kind), "adagrad")
        assert {p["table"] for p in pieces} == {"a", "b"}
    back = recut(pieces, [(t.name, Shard(0, 0, t.num_rows, 0, t.dim)) for t in TABLES], "adagrad")
    for got, want in zip(back, whole()):
        assert torch.equal(got["weight"], want["weight"]) and torch.equal(got["state"]["sum"], want["state"]["sum"])


def test_recut_names_a_hole_in_the_checkpoint():
    pieces = recut(whole(), targets(2, "row_wise"), "adagrad")
    pieces = [p for p in pieces if not (p["table"] == "b" and p["rows"][0] > 0)]
    with pytest.raises(PlanError, match=r"checkpoint has no values for table b row 4, column 0"):
        recut(pieces, [("b", Shard(0, 0, 7, 0, 6))], "adagrad")


def test_cli_unshards_and_reshards_a_training_checkpoint(small_data, tmp_path):
    cfg_path, data = small_data
    ckpt = tmp_path / "ckpt"
    assert train_main(["--config", str(cfg_path), f"--data.path={data}", "--train.max_steps=5",
                       f"--checkpoint.dir={ckpt}", "--plan.default=row_wise"]) == 0
    state = load_latest(ckpt)
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.pt"), "--unsharded")
    assert r.returncode == 0, r.stderr
    model = torch.load(tmp_path / "m.pt", weights_only=False)
    assert model["step"] == 5 and sorted(model["tables"]) == ["c1", "c2", "c3", "c4"]
    piece = next(p for p in state["shards"] if p["table"] == "c4")
    assert torch.equal(model["tables"]["c4"][piece["rows"][0]:piece["rows"][1]], piece["weight"])
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c4"),
                "--world-size", "4", "--plan.default=column_wise")
    assert r.returncode == 0, r.stderr
    four = open_latest(tmp_path / "c4")
    assert four.path.name == "step_5" and four.common["world_size"] == 4 and four.world_size == 4
    # Each new rank's file holds exactly its own column of c1.
    assert [[c for t, _, c in held if t == "c1"] for held in four.index] == [[[0, 2]], [[2, 4]], [[4, 6]], [[6, 8]]]
    assert [p["cols"] for p in four.rank_state(2)["shards"] if p["table"] == "c1"] == [(4, 6)]
    r = run_cli("-m", "distrec", "reshard", "--checkpoint", str(tmp_path / "none"), "--out", "x")
    assert r.returncode == 2 and "no checkpoint" in r.stderr
