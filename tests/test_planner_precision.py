"""The planner counts bytes per precision: half-precision storage halves the weights (optimizer state
stays fp32), half-precision exchanges halve the pooled rows or their gradients on the wire, a bf16
dense all-reduce halves its bytes; a config's precisions reach the workload, the report and `distrec
plan`; calibration measures the dense part under bf16 and the planner uses that rate. Every expected
number is worked out from the model's formulas here (simple_topology: round rates, no latency)."""
from __future__ import annotations

import dataclasses

import pytest

from distrec.config import load_config, table_specs
from distrec.trainer.plan_inputs import tables_of, workload_of
from sharding.plan import load_plan
from sharding.planner import DenseCost, InfeasiblePlanError, Workload, estimate_plan, plan_tables, simple_plan
from sharding.planner.calibration import CalibrationSpec, apply_calibration, rates_from_seconds
from sharding.planner.estimate import (FP32_BYTES, allreduce_seconds, alltoall_seconds_per_byte, dense_seconds,
                                       optimizer_bytes, option_of, piece_cost, requester_bytes, table_bytes)
from sharding.planner.exchange import output_bytes, two_level_delta, with_exchange
from sharding.planner.report import format_result
from sharding.types import BYTES_PER_ELEMENT, Shard, ShardingType, TableConfig
from tests.conftest import REPO
from tests.test_planner import simple_topology, work
from tests.test_plan_cmd import TERABYTE, plan_cli

KINDS = [ShardingType.TABLE_WISE, ShardingType.ROW_WISE, ShardingType.COLUMN_WISE]


def tables(precision: str, n: int = 4) -> list[TableConfig]:
    return [TableConfig(f"t{i}", 1000, 16, precision=precision) for i in range(n)]


def pooled(**changes) -> Workload:
    return work(pooling={f"t{i}": 2.0 for i in range(4)}, **changes)


# ---- storage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("half", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_half_storage_halves_the_weights_and_keeps_the_optimizer_state(kind, half):
    topo, w = simple_topology(), pooled()
    shard = Shard(None, 0, 250, 0, 16)
    full, halved = (piece_cost(t[0], shard, kind, w, topo) for t in (tables("fp32"), tables(half)))
    assert full.weights == 250 * 16 * FP32_BYTES and halved.weights == 250 * 16 * BYTES_PER_ELEMENT[half]
    assert halved.weights == full.weights / 2 and halved.optimizer == full.optimizer == optimizer_bytes("adagrad", 250, 16)
    per_rank = [estimate_plan(simple_plan(t, 4, kind), t, topo, w) for t in (tables("fp32"), tables(half))]
    for r32, r16 in zip(*per_rank):
        assert r16.memory.weights == r32.memory.weights / 2 > 0
        assert r16.memory.optimizer == r32.memory.optimizer > 0
        assert r16.memory.workspace == r32.memory.workspace  # fp32: gradients and the optimizer's copies


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_data_parallel_replicas_are_counted_in_fp32_as_the_runtime_keeps_them(half):
    topo, w, kind = simple_topology(), pooled(), ShardingType.DATA_PARALLEL
    shard = Shard(None, 0, 1000, 0, 16)
    full, halved = (piece_cost(t[0], shard, kind, w, topo) for t in (tables("fp32"), tables(half)))
    assert halved == full and full.weights == 1000 * 16 * FP32_BYTES


def test_a_half_table_reads_and_writes_half_rows_and_pools_in_fp32():
    topo = simple_topology()
    t = TableConfig("t", 1000, 16, precision="fp16")
    c = piece_cost(t, Shard(None, 0, 1000, 0, 16), ShardingType.TABLE_WISE, work(), topo)
    # 400 bags, 800 ids, 800 rows touched; a stored row 16 x 2 bytes, a pooled or gradient row 16 x 4
    stored, fp32, state = 16 * 2, 16 * 4, 16 * 4
    assert c.lookup_fwd_s == pytest.approx((800 * stored + 400 * fp32) / 0.5e9)
    assert c.lookup_bwd_s == pytest.approx((400 * fp32 + 800 * (fp32 + 8) + 800 * 2 * (stored + state)) / 0.5e9)
    assert c.workspace == 800 * (fp32 + 8) + 800 * fp32 * 3
    assert table_bytes(t, "adagrad") == 1000 * stored + 1000 * state


# ---- the output all-to-all ----------------------------------------------------------------------

def comm_seconds(forward: str, backward: str) -> tuple[float, float]:
    """comm_fwd, comm_bwd of rank 0 for four table-wise tables on four ranks (one each)."""
    t = tables("fp32")
    rank = estimate_plan(simple_plan(t, 4, "table_wise"), t, simple_topology(),
                         pooled(comm_precision=forward, comm_precision_backward=backward))[0]
    return rank.time.comm_fwd, rank.time.comm_bwd


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_half_forward_comm_halves_the_pooled_rows_only(half):
    s = alltoall_seconds_per_byte(simple_topology())
    ids = (800 + 400) * 8  # the owner's ids and lengths in: as many as every rank sends for its samples
    pooled_rows = 400 * 16  # values a rank sends back (its table's 400 bags) and receives (4 x 100 bags)
    assert comm_seconds("fp32", "fp32") == pytest.approx(((ids + pooled_rows * 4) * s, pooled_rows * 4 * s))
    assert comm_seconds(half, "fp32") == pytest.approx(((ids + pooled_rows * 2) * s, pooled_rows * 4 * s))
    assert comm_seconds("fp32", half) == pytest.approx(((ids + pooled_rows * 4) * s, pooled_rows * 2 * s))
    c = piece_cost(tables("fp32")[0], Shard(None, 0, 1000, 0, 16), ShardingType.TABLE_WISE, pooled(comm_precision=half),
                   simple_topology())
    assert (c.pooled_out, c.grads_in) == (pooled_rows * 2, pooled_rows * 4)
    assert c.buffers == ids + 2 * pooled_rows * 4  # held in fp32 whatever the wire carries


def test_requester_bytes_follow_each_direction():
    t = tables("fp32")[0]
    option = option_of(t, simple_plan([t], 4, "row_wise").tables[t.name])[0]
    full = requester_bytes(t, option, pooled())
    half = requester_bytes(t, option, pooled(comm_precision="bf16", comm_precision_backward="fp16"))
    assert half == (full[0], full[1] / 2, full[2] / 2)
    assert full[1] == 100 * 4 * 16 * 4  # 100 samples x 4 row shards' partial sums x 16 columns x fp32


def test_two_level_exchange_in_each_directions_precision():
    topo = simple_topology(world=4, nodes=2)
    t = tables("fp32")
    plan = with_exchange(simple_plan(t, 4, "row_wise"), topo, "two_level")
    full, half = output_bytes(plan, topo, pooled(), "two_level"), output_bytes(plan, topo, pooled(), "two_level", 2)
    assert [tuple(x / 2 for x in link) for link in full] == half
    base = two_level_delta(plan, topo, pooled())
    fwd_half = two_level_delta(plan, topo, pooled(comm_precision="fp16"))
    bwd_half = two_level_delta(plan, topo, pooled(comm_precision_backward="bf16"))
    assert all(f < 0 for f, _ in base)  # two-level saves here (the inter-node link is the slow one)
    fwd, bwd = zip(*base)  # no latency: the seconds follow the bytes
    assert list(zip(*fwd_half)) == [pytest.approx([f / 2 for f in fwd]), bwd]
    assert list(zip(*bwd_half)) == [fwd, pytest.approx([b / 2 for b in bwd])]


# ---- the dense part ------------------------------------------------------------------------------

def test_bf16_dense_comm_halves_the_dense_all_reduce():
    topo, dense = simple_topology(), DenseCost(flops_per_sample=1e5, params=10_000)
    fp32, bf16 = (dense_seconds(dense, work(dense=dense, dense_comm_precision=p), topo) for p in ("fp32", "bf16"))
    all_reduce_fp32 = 2 * 3 / 4 * 10_000 * 4 / 1e8  # ring over 4 ranks, fp32 gradients, intra-node link
    assert allreduce_seconds(10_000 * 4, topo) == pytest.approx(all_reduce_fp32)
    assert fp32 - bf16 == pytest.approx(all_reduce_fp32 / 2)


def test_bf16_dense_matmuls_run_at_the_calibrated_speedup():
    dense = DenseCost(flops_per_sample=1e5, params=10)
    topo = simple_topology(dense_bf16_speedup=2.5)
    compute = 3 * 1e5 * 100 / 1e12
    fp32, bf16 = (dense_seconds(dense, work(dense=dense, dense_precision=p), topo) for p in ("fp32", "bf16"))
    assert fp32 - bf16 == pytest.approx(compute - compute / 2.5)


def test_calibration_measures_the_dense_rate_in_bf16():
    spec = CalibrationSpec(world_size=1, tables=[(300, 16)], batch_per_rank=1024, bf16=True, precision="bf16",
                           dense=DenseCost(flops_per_sample=1e5, params=1000))
    dense = [3 * 1e5 * b / 1e10 + 1e-3 for b in spec.batches()]
    dense_bf16 = [3 * 1e5 * b / 4e10 + 2e-3 for b in spec.batches()]
    slowest = {"runtime": [1e-3, 5e-3], "dense": dense, "dense_bf16": dense_bf16, "full": [1e-2]}
    rates = rates_from_seconds(spec, slowest)
    assert rates["dense_flops_per_s"] == pytest.approx(1e10) and rates["dense_bf16_flops_per_s"] == pytest.approx(4e10)
    assert rates["beyond_parts_s"] == pytest.approx(1e-2 - 5e-3 - dense_bf16[1])  # the step ran in bf16
    topo = apply_calibration(simple_topology(), rates, "here")
    assert topo.dense_bf16_speedup == pytest.approx(4.0)
    assert "dense_bf16_flops_per_s" not in rates_from_seconds(spec, {k: slowest[k] for k in ("runtime", "dense")})


# ---- fits only in half precision -----------------------------------------------------------------

def test_tables_that_fit_only_in_fp16():
    big = [TableConfig(f"t{i}", 1_000_000, 64) for i in range(4)]
    half = [dataclasses.replace(t, precision="fp16") for t in big]
    w = Workload(batch_per_rank=100, optimizer="rowwise_adagrad", reserve_bytes=0.0)
    per_rank = {p: sum(table_bytes(t, w.optimizer) for t in ts) / 2 for p, ts in (("fp32", big), ("fp16", half))}
    hbm = 400e6
    assert per_rank["fp16"] < hbm < per_rank["fp32"]  # 2 x (128 + 4) MB and 2 x (256 + 4) MB per rank
    topo = simple_topology(world=2, hbm_bytes=hbm)
    result = plan_tables(half, topo, w, dp_max_bytes=0)
    assert max(r.memory.weights for r in result.ranks) == 2 * 1_000_000 * 64 * 2
    with pytest.raises(InfeasiblePlanError, match=r"smallest change that fits: \d+ ranks \(--gpus \d+\)") as e:
        plan_tables(big, topo, w, dp_max_bytes=0)
    assert e.value.missing_bytes_per_rank > per_rank["fp32"] - hbm


# ---- from the config -----------------------------------------------------------------------------

def test_workload_of_reads_the_configs_precisions():
    cfg = load_config(None, ["--plan.comm_precision=fp16", "--plan.dense_comm_precision=bf16",
                             "--train.precision=bf16", "--tables.precision=bf16"])
    specs = table_specs(cfg)
    w = workload_of(cfg, specs, world_size=2)
    assert (w.comm_precision, w.comm_precision_backward, w.dense_comm_precision, w.dense_precision) == \
        ("fp16", "fp16", "bf16", "bf16")  # backward "same": as the forward
    assert (w.comm_bytes_forward, w.comm_bytes_backward, w.dense_comm_bytes) == (2, 2, 2)
    assert {t.precision for t in tables_of(specs)} == {"bf16"}
    cfg = load_config(None, ["--plan.comm_precision=bf16", "--plan.comm_precision_backward=fp32"])
    w = workload_of(cfg, table_specs(cfg), world_size=2)
    assert (w.comm_bytes_forward, w.comm_bytes_backward, w.dense_comm_bytes) == (2, 4, 4)


def test_report_shows_storage_and_exchange_precisions():
    t = tables("fp32", 2) + [TableConfig("h", 1000, 16, precision="bf16")]
    w = work(pooling={}, comm_precision="fp16", comm_precision_backward="fp32", dense_comm_precision="bf16")
    text = format_result(plan_tables(t, simple_topology(world=2), w), t)
    assert "pooled all-to-all fp16 forward, fp32 backward; dense all-reduce bf16" in text
    assert next(line for line in text.splitlines() if line.startswith("h ")).split()[6] == "bf16"  # after the size's number and unit


def test_distrec_plan_with_fp16_tables(tmp_path, capsys):
    out = tmp_path / "plan.json"
    r = plan_cli(capsys, *TERABYTE, "--gpus", "8", "--hbm-gb", "16", "--tables.precision=fp16",
                 "--plan.comm_precision=bf16", "--json", str(out))
    assert r.returncode == 0, r.stderr
    cfg = load_config(str(REPO / "configs/criteo_terabyte.toml"), ["--tables.precision=fp16"])
    specs = table_specs(cfg)
    lines = r.stdout.splitlines()
    plan = load_plan(out, tables_of(specs), world_size=8)
    assert set(plan.tables) == {s.name for s in specs}
    for s in specs:  # replicas are kept in fp32 by the runtime, and the report says so
        row = next(line for line in lines if line.startswith(f"{s.name} "))
        replicated = plan.tables[s.name].sharding_type == ShardingType.DATA_PARALLEL
        assert row.split()[6] == ("fp32" if replicated else "fp16"), row
    assert "pooled all-to-all bf16 forward, bf16 backward" in r.stdout
