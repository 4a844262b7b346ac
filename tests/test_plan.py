"""sharding.planner.simple_plan layouts; sharding.plan: validate_plan, plan JSON files, describe_plan."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from sharding.plan import describe_plan, load_plan, plan_to_json, save_plan, table_hash, validate_plan
from sharding.planner import simple_plan
from sharding.types import PlanError, Shard, ShardingPlan, ShardingType, TableConfig, TablePlan

TW, RW, CW, DP = (ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE,
                  ShardingType.DATA_PARALLEL)


def tables4() -> list[TableConfig]:
    return [TableConfig("C1", 100, 8), TableConfig("C2", 10, 4, pooling="mean"),
            TableConfig("C3", 1000, 10), TableConfig("C4", 3, 2)]


def mixed_plan(world_size: int = 4) -> tuple[ShardingPlan, list[TableConfig]]:
    tables = tables4()
    plan = simple_plan(tables, world_size, "table_wise",
                       {"C1": "data_parallel", "C2": "column_wise", "C3": "row_wise"})
    return plan, tables


def ranges(shards: list[Shard], axis: str) -> list[tuple[int, int, int]]:
    """(rank, start, end) along ``axis``, in shard order."""
    if axis == "row":
        return [(s.rank, s.row_start, s.row_end) for s in shards]
    return [(s.rank, s.col_start, s.col_end) for s in shards]


# ------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_table_wise_single_table_is_one_full_shard_on_rank_0(world_size):
    plan = simple_plan([TableConfig("T", 7, 3)], world_size, "table_wise")
    assert plan.world_size == world_size
    assert plan.tables == {"T": TablePlan("T", TW, [Shard(0, 0, 7, 0, 3)])}


@pytest.mark.parametrize("num_rows,world_size,expected", [
    (10, 1, [(0, 0, 10)]),
    (8, 2, [(0, 0, 4), (1, 4, 8)]),
    (7, 3, [(0, 0, 3), (1, 3, 6), (2, 6, 7)]),
    (10, 4, [(0, 0, 3), (1, 3, 6), (2, 6, 9), (3, 9, 10)]),
    (9, 4, [(0, 0, 3), (1, 3, 6), (2, 6, 9)]),  # ceil(9/4)=3 leaves rank 3 nothing
    (3, 4, [(0, 0, 1), (1, 1, 2), (2, 2, 3)]),  # fewer rows than ranks: no empty shards
    (1, 2, [(0, 0, 1)]),
])
def test_row_wise_blocks(num_rows, world_size, expected):
    plan = simple_plan([TableConfig("T", num_rows, 5)], world_size, "row_wise")
    tp = plan.tables["T"]
    assert tp.sharding_type is RW
    assert ranges(tp.shards, "row") == expected
    assert all((s.col_start, s.col_end) == (0, 5) for s in tp.shards)


@pytest.mark.parametrize("dim,world_size,expected", [
    (8, 1, [(0, 0, 8)]),
    (10, 4, [(0, 0, 3), (1, 3, 6), (2, 6, 8), (3, 8, 10)]),  # widths 3,3,2,2
    (7, 3, [(0, 0, 3), (1, 3, 5), (2, 5, 7)]),
    (8, 2, [(0, 0, 4), (1, 4, 8)]),
    (2, 4, [(0, 0, 1), (1, 1, 2)]),  # min(W, dim) blocks
    (1, 3, [(0, 0, 1)]),
])
def test_column_wise_blocks(dim, world_size, expected):
    plan = simple_plan([TableConfig("T", 6, dim)], world_size, "column_wise")
    tp = plan.tables["T"]
    assert tp.sharding_type is CW
    assert ranges(tp.shards, "col") == expected
    assert all((s.row_start, s.row_end) == (0, 6) for s in tp.shards)


def test_column_wise_tables_rotate_their_first_rank():
    # The table-wise table in between must not advance the rotation.
    tables = [TableConfig("A", 5, 2), TableConfig("B", 5, 2), TableConfig("X", 5, 2),
              TableConfig("C", 5, 2), TableConfig("D", 5, 2)]
    plan = simple_plan(tables, 4, "column_wise", {"X": "table_wise"})
    got = {n: [s.rank for s in plan.tables[n].shards] for n in "ABCD"}
    assert got == {"A": [0, 1], "B": [1, 2], "C": [2, 3], "D": [3, 0]}
    assert [s.col_start for s in plan.tables["D"].shards] == [0, 1]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_data_parallel_full_replica_on_every_rank(world_size):
    plan = simple_plan([TableConfig("T", 4, 3)], world_size, ShardingType.DATA_PARALLEL)
    assert plan.tables["T"] == TablePlan("T", DP, [Shard(r, 0, 4, 0, 3) for r in range(world_size)])


@pytest.mark.parametrize("kind", list(ShardingType))
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_simple_plan_validates(kind, world_size):
    tables = tables4() + [TableConfig("tiny", 1, 1)]
    plan = simple_plan(tables, world_size, kind)
    validate_plan(plan, tables, world_size)
    assert list(plan.tables) == [t.name for t in tables]
    assert all(tp.sharding_type is kind for tp in plan.tables.values())


# ------------------------------------------------------------------------------------ greedy balance

def test_table_wise_greedy_largest_first_on_least_loaded_rank():
    # Sizes 800, 480, 400, 240, 80 on 2 ranks: A->0, B->1, C->1 (480<800), D->0 (800<880), E->1.
    tables = [TableConfig("E", 10, 8), TableConfig("C", 50, 8), TableConfig("A", 100, 8),
              TableConfig("D", 30, 8), TableConfig("B", 60, 8)]
    plan = simple_plan(tables, 2, "table_wise")
    assert {n: tp.shards[0].rank for n, tp in plan.tables.items()} == {"A": 0, "B": 1, "C": 1, "D": 0, "E": 1}
    assert list(plan.tables) == ["E", "C", "A", "D", "B"]  # config order kept


def test_table_wise_ties_go_to_lowest_rank_in_config_order():
    tables = [TableConfig(n, 10, 4) for n in ["Z", "Y", "X", "W"]]
    plan = simple_plan(tables, 3, "table_wise")
    assert {n: tp.shards[0].rank for n, tp in plan.tables.items()} == {"Z": 0, "Y": 1, "X": 2, "W": 0}


def test_table_wise_counts_load_of_other_types():
    # The row-wise table puts 2 rows on rank 0 and 1 on rank 1, so the table-wise table goes to rank 1.
    tables = [TableConfig("T", 1, 1), TableConfig("R", 3, 100)]
    plan = simple_plan(tables, 2, "table_wise", {"R": "row_wise"})
    assert plan.tables["T"].shards[0].rank == 1
    # Same with a column-wise table whose wider block sits on rank 0.
    tables = [TableConfig("T", 1, 1), TableConfig("K", 100, 3)]
    plan = simple_plan(tables, 2, "table_wise", {"K": "column_wise"})
    assert plan.tables["T"].shards[0].rank == 1


def test_simple_plan_is_deterministic():
    tables = tables4() + [TableConfig(f"t{i}", 10 * (i % 3 + 1), 4) for i in range(8)]
    assert simple_plan(tables, 3, "table_wise") == simple_plan(tables, 3, "table_wise")


# ----------------------------------------------------------------------------------------- overrides

def test_overrides_by_string_and_enum():
    plan, _ = mixed_plan()
    assert {n: tp.sharding_type for n, tp in plan.tables.items()} == {"C1": DP, "C2": CW, "C3": RW, "C4": TW}
    plan = simple_plan(tables4(), 2, TW, {"C4": ShardingType.ROW_WISE})
    assert plan.tables["C4"].sharding_type is RW and plan.tables["C1"].sharding_type is TW


def test_override_of_unknown_table_names_it():
    with pytest.raises(PlanError, match="C9"):
        simple_plan(tables4(), 2, "table_wise", {"C9": "row_wise"})


def test_unknown_type_lists_valid_types():
    for default, overrides in [("row-wize", None), ("table_wise", {"C2": "diagonal"})]:
        with pytest.raises(PlanError) as err:
            simple_plan(tables4(), 2, default, overrides)
        msg = str(err.value)
        assert all(k.value in msg for k in ShardingType), msg
    with pytest.raises(PlanError, match="C2"):
        simple_plan(tables4(), 2, "table_wise", {"C2": "diagonal"})


def test_simple_plan_rejects_bad_inputs():
    with pytest.raises(PlanError, match="world size"):
        simple_plan(tables4(), 0, "table_wise")
    with pytest.raises(PlanError, match="C1.*twice"):
        simple_plan(tables4() + [TableConfig("C1", 5, 5)], 2, "table_wise")
    with pytest.raises(PlanError, match="Z"):
        simple_plan([TableConfig("Z", 0, 4)], 2, "table_wise")


# ----------------------------------------------------------------------------------------- validate

def _shards(plan, name, *shards):
    plan.tables[name].shards = list(shards)


BAD_PLANS = {
    "missing table": (lambda p: p.tables.pop("C2"), r"table C2 is configured but not in the plan"),
    "extra table": (lambda p: p.tables.__setitem__("X", TablePlan("X", TW, [Shard(0, 0, 1, 0, 1)])),
                    r"table X is in the plan but not configured"),
    "rank too high": (lambda p: _shards(p, "C4", Shard(5, 0, 3, 0, 2)),
                      r"plan places table C4 on rank 5 but only 4 ranks exist"),
    "negative rank": (lambda p: _shards(p, "C4", Shard(-1, 0, 3, 0, 2)), r"table C4 on rank -1"),
    "world size": (lambda p: setattr(p, "world_size", 8), r"made for 8 ranks, this job has 4"),
    "entry name": (lambda p: setattr(p.tables["C4"], "table", "C1"), r"C4.*C1"),
    "no shards": (lambda p: _shards(p, "C4"), r"no shards for table C4"),
    "outside table": (lambda p: _shards(p, "C4", Shard(0, 0, 4, 0, 2)), r"table C4 .*outside"),
    "empty shard": (lambda p: p.tables["C3"].shards.append(Shard(0, 5, 5, 0, 10)), r"table C3 .*empty"),
    "table-wise two shards": (lambda p: _shards(p, "C4", Shard(0, 0, 3, 0, 2), Shard(1, 0, 3, 0, 2)),
                              r"table-wise table C4 must have exactly one shard"),
    "table-wise partial": (lambda p: _shards(p, "C4", Shard(0, 0, 2, 0, 2)),
                           r"table-wise table C4 must have exactly one shard"),
    "row-wise gap": (lambda p: p.tables["C3"].shards.pop(1),
                     r"row-wise table C3 has no shard for rows \[250, 500\)"),
    "row-wise short": (lambda p: p.tables["C3"].shards.pop(),
                       r"row-wise table C3 has no shard for rows \[750, 1000\)"),
    "row-wise overlap": (lambda p: p.tables["C3"].shards.append(Shard(0, 100, 300, 0, 10)),
                         r"row-wise table C3 has overlapping shards"),
    "row-wise narrow": (lambda p: _shards(p, "C3", Shard(0, 0, 500, 0, 10), Shard(1, 500, 1000, 0, 9)),
                        r"row-wise table C3 .*all columns"),
    "column-wise gap": (lambda p: p.tables["C2"].shards.pop(0),
                        r"column-wise table C2 has no shard for columns \[0, 1\)"),
    "column-wise overlap": (lambda p: p.tables["C2"].shards.append(Shard(2, 0, 10, 0, 2)),
                            r"column-wise table C2 has overlapping shards"),
    "column-wise short": (lambda p: _shards(p, "C2", Shard(0, 0, 10, 0, 3), Shard(1, 0, 9, 3, 4)),
                          r"column-wise table C2 .*all rows"),
    "data-parallel missing rank": (lambda p: p.tables["C1"].shards.pop(2),
                                   r"data-parallel table C1 .*no replica on rank\(s\) 2"),
    "data-parallel duplicate": (lambda p: p.tables["C1"].shards.__setitem__(3, Shard(0, 0, 100, 0, 8)),
                                r"data-parallel table C1 .*rank\(s\) 3"),
    "data-parallel extra": (lambda p: p.tables["C1"].shards.append(Shard(0, 0, 100, 0, 8)),
                            r"data-parallel table C1 .*more than one replica"),
    "data-parallel partial": (lambda p: p.tables["C1"].shards.__setitem__(1, Shard(1, 0, 50, 0, 8)),
                              r"data-parallel table C1 .*not the whole table"),
    "bad type": (lambda p: setattr(p.tables["C4"], "sharding_type", "zigzag"), r"zigzag.*C4"),
}


def test_mixed_plan_is_valid_before_mutation():
    plan, tables = mixed_plan()
    validate_plan(plan, tables, 4)
    assert ranges(plan.tables["C3"].shards, "row") == [(0, 0, 250), (1, 250, 500), (2, 500, 750),
                                                       (3, 750, 1000)]
    assert ranges(plan.tables["C2"].shards, "col") == [(0, 0, 1), (1, 1, 2), (2, 2, 3), (3, 3, 4)]


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_validate_plan_catches(case):
    mutate, pattern = BAD_PLANS[case]
    plan, tables = mixed_plan()
    mutate(plan)
    with pytest.raises(PlanError, match=pattern):
        validate_plan(plan, tables, 4)


def test_validate_plan_checks_job_world_size():
    plan, tables = mixed_plan(world_size=4)
    with pytest.raises(PlanError, match="made for 4 ranks, this job has 2"):
        validate_plan(plan, tables, 2)


# --------------------------------------------------------------------------------------------- JSON

@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_json_round_trip(tmp_path, world_size):
    plan, tables = mixed_plan(world_size)
    path = tmp_path / "plan.json"
    save_plan(path, plan, tables)
    loaded = load_plan(path, tables, world_size)
    assert loaded == plan
    assert all(isinstance(tp.sharding_type, ShardingType) for tp in loaded.tables.values())
    assert list(tmp_path.iterdir()) == [path]  # the temporary file was renamed, not left behind


def test_json_layout():
    plan, tables = mixed_plan()
    doc = json.loads(plan_to_json(plan, tables))
    assert doc["format_version"] == 1 and doc["world_size"] == 4
    assert doc["table_hash"] == table_hash(tables) and re.fullmatch(r"[0-9a-f]{64}", doc["table_hash"])
    assert list(doc["tables"]) == ["C1", "C2", "C3", "C4"]
    c3 = doc["tables"]["C3"]
    assert (c3["sharding_type"], c3["num_rows"], c3["dim"]) == ("row_wise", 1000, 10)
    assert c3["shards"][1] == {"rank": 1, "row_start": 250, "row_end": 500, "col_start": 0, "col_end": 10}


def test_table_hash_ignores_order_but_not_contents():
    tables = tables4()
    assert table_hash(tables) == table_hash(list(reversed(tables)))
    for changed in [dataclasses.replace(tables[1], num_rows=11), dataclasses.replace(tables[1], dim=5),
                    dataclasses.replace(tables[1], pooling="sum"), dataclasses.replace(tables[1], name="C2b")]:
        assert table_hash(tables[:1] + [changed] + tables[2:]) != table_hash(tables)


def test_save_overwrites_and_refuses_invalid_plan(tmp_path):
    plan, tables = mixed_plan()
    path = tmp_path / "plan.json"
    path.write_text("old")
    save_plan(path, plan, tables)
    assert json.loads(path.read_text())["world_size"] == 4
    plan.tables["C4"].shards[0] = Shard(9, 0, 3, 0, 2)
    with pytest.raises(PlanError, match="C4 on rank 9"):
        save_plan(path, plan, tables)
    assert json.loads(path.read_text())["tables"]["C4"]["shards"][0]["rank"] != 9
    assert list(tmp_path.iterdir()) == [path]


@pytest.fixture
def saved(tmp_path):
    plan, tables = mixed_plan()
    path = tmp_path / "plan.json"
    save_plan(path, plan, tables)
    return path, tables


def _replace(tables, name, **changes):
    return [dataclasses.replace(t, **changes) if t.name == name else t for t in tables]


@pytest.mark.parametrize("changes,pattern", [
    ({"num_rows": 2000}, r"plan\.json: table C3 has 1000 rows in the plan but 2000 in the config"),
    ({"dim": 16}, r"plan\.json: table C3 has dim 10 in the plan but 16 in the config"),
    ({"pooling": "mean"}, r"plan\.json: table C3 has pooling 'sum' in the plan but 'mean' in the config"),
])
def test_load_names_changed_table(saved, changes, pattern):
    path, tables = saved
    with pytest.raises(PlanError, match=pattern):
        load_plan(path, _replace(tables, "C3", **changes), 4)


def test_load_names_missing_and_extra_tables(saved):
    path, tables = saved
    with pytest.raises(PlanError, match=r"table C9 is configured but not in the plan"):
        load_plan(path, tables + [TableConfig("C9", 5, 4)], 4)
    with pytest.raises(PlanError, match=r"table C2 is in the plan but not configured"):
        load_plan(path, [t for t in tables if t.name != "C2"], 4)


def test_load_wrong_world_size(saved):
    path, tables = saved
    with pytest.raises(PlanError, match=r"plan\.json was made for 4 ranks, this job has 2"):
        load_plan(path, tables, 2)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "plan.json"
    with pytest.raises(PlanError, match=re.escape(str(path))):
        load_plan(path, tables4(), 4)


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("edit,pattern", [
    (lambda d: d.__setitem__("format_version", 2), r"plan\.json: sharding plan format_version 2, this code reads 1"),
    (lambda d: d.pop("format_version"), r"plan\.json: sharding plan format_version None, this code reads 1"),
    (lambda d: d.__setitem__("table_hash", "0" * 64), r"table_hash does not match"),
    (lambda d: d["tables"]["C2"].update(pooling="sum"), r"C2 has pooling 'sum' in the plan but 'mean'"),
    (lambda d: d["tables"]["C4"]["shards"][0].update(rank=7), r"plan\.json: plan places table C4 on rank 7"),
    (lambda d: d["tables"]["C4"].update(sharding_type="diagonal"),
     r"plan\.json: unknown sharding type 'diagonal' for table C4"),
    (lambda d: d["tables"]["C4"]["shards"][0].pop("row_end"), r"plan\.json: table C4 has malformed shards"),
    (lambda d: d["tables"]["C3"].pop("dim"), r"plan\.json: table C3 has no 'dim'"),
    (lambda d: d.pop("tables"), r"no 'tables'"),
])
def test_load_rejects_edited_file(saved, edit, pattern):
    path, tables = saved
    _edit(path, edit)
    with pytest.raises(PlanError, match=pattern):
        load_plan(path, tables, 4)


def test_load_pooling_missing_from_file_falls_back_to_hash(saved):
    path, tables = saved
    _edit(path, lambda d: [e.pop("pooling") for e in d["tables"].values()])
    assert load_plan(path, tables, 4) == mixed_plan()[0]  # absent pooling is fine while the hash matches
    with pytest.raises(PlanError, match="table_hash does not match"):
        load_plan(path, _replace(tables, "C2", pooling="sum"), 4)


def test_load_bad_json(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match=r"plan\.json: not a readable sharding plan file"):
        load_plan(path, tables4(), 4)


# ------------------------------------------------------------------------------------------ describe

def test_describe_plan():
    plan, tables = mixed_plan()
    lines = describe_plan(plan, tables).splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["table", "rows", "dim", "type", "ranks"]
    assert [ln.split() for ln in lines[1:]] == [
        ["C1", "100", "8", "data_parallel", "0-3"],
        ["C2", "10", "4", "column_wise", "0-3"],
        ["C3", "1000", "10", "row_wise", "0-3"],
        ["C4", "3", "2", "table_wise", str(plan.tables["C4"].shards[0].rank)],
    ]
    # Columns line up: every row starts its "type" column at the same offset.
    type_words = ["type", "data_parallel", "column_wise", "row_wise", "table_wise"]
    assert len({ln.index(w) for ln, w in zip(lines, type_words)}) == 1


def test_describe_plan_compresses_rank_lists():
    tables = [TableConfig("A", 5, 2), TableConfig("B", 5, 2)]
    plan = simple_plan(tables, 4, "column_wise")
    plan.tables["A"].shards = [Shard(r, 0, 5, i, i + 1) for i, r in enumerate([0, 2])]
    text = describe_plan(plan, tables)
    assert text.splitlines()[1].split()[-1] == "0,2"
    assert text.splitlines()[2].split()[-1] == "1-2"
