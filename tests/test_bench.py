"""distrec bench: the report from a stored results.json, the comparison, and one real run."""
from __future__ import annotations

import copy
import json

from distrec.tools.bench.compare import compare
from distrec.tools.bench.matrix import FULL, ModelSpec, RunSpec, QUICK, sweep
from distrec.tools.bench.report import write_report
from distrec.tools.bench.runner import Bench
from tests.conftest import run_cli

PHASES = {"data_wait": 1.0, "input_a2a": 5.0, "lookup": 3.0, "output_a2a": 4.0, "grad_a2a": 1.0, "grad_allreduce": 2.0,
          "optimizer": 1.5, "dense_fwd_bwd": 9.0, "step": 24.5}
OVERLAP = {"input_a2a": {"in_flight": 4.0, "waited": 3.0, "hidden": 1.0},
           "output_a2a": {"in_flight": 6.0, "waited": 2.5, "hidden": 3.5},
           "grad_a2a": {"in_flight": 5.0, "waited": 0.5, "hidden": 4.5}}


def run(engine: str, strategy: str, ranks: int, batch: int = 2048, sps: float = 10_000.0, repeat: int = 0,
        status: str = "ok", steps: int = 20, purpose: str = "speed", **extra) -> dict:
    spec = RunSpec("demo", engine, strategy, ranks, repeat, batch, steps, purpose).to_dict()
    if status != "ok":
        return {**spec, "status": status, "error": "exit code 1: Traceback\nRuntimeError: boom", "command": "x"}
    out = {**spec, "status": "ok", "command": f"torchrun ... {engine}", "samples_per_s": sps, "auc": 0.70,
           "logloss": 0.40, "measured_step_ms": 1e3 * batch / sps, "peak_rss_bytes": [6e8] * ranks,
           "eval_curve": [[batch * 10, 0.6], [batch * 20, 0.7]]}
    if engine == "sync":
        out.update(breakdown_ms=dict(PHASES), overlap_ms=copy.deepcopy(OVERLAP), estimated_step_ms=30.0)
    return {**out, **extra}


def results() -> dict:
    runs = [run("sync", "planner", 1, sps=10_000), run("sync", "planner", 1, sps=11_000, repeat=1),
            run("sync", "planner", 2, sps=16_000), run("sync", "planner", 2, sps=18_000, repeat=1),
            run("sync", "planner", 1, batch=1024, sps=9_000),
            run("torchrec", "planner", 2, sps=8_000), run("ps", "hash", 2, sps=4_000, auc=0.65),
            run("horovod", "planner", 2, status="failed"),
            # the accuracy runs: 100 global batches each; sync twice (AUC 0.74 and 0.76), the PS at 2 and 8 workers
            *(run("sync", "planner", 2, steps=100, purpose="accuracy", auc=a, repeat=k) for k, a in enumerate((0.74, 0.76))),
            run("ps", "hash", 2, steps=100, purpose="accuracy", auc=0.755, staleness_mean=0.7, staleness_p99=2.0),
            run("ps", "hash", 8, steps=100, purpose="accuracy", auc=0.70, sps=2_000, staleness_mean=5.5,
                staleness_p99=14.0)]
    parts = {8: (1.0, 0.5), 16: (1.0, 1.5), 64: (1.0, 2.0)}  # (lookup, all-to-all) ms: the all-to-all leaves the node
    projection = {"model": "demo", "preset": "h100-80g", "gpus_per_node": 8,
                  "calibration": {"lookup_ratio": 0.5, "comm_ratio": 2.0, "runs": ["demo-sync-planner-r2-b2048-0"],
                                  "rates": "r/calibration.json"},
                  "points": [{"gpus": g, "nodes": max(1, g // 8), "batch_per_rank": 1024,
                              "preset": {"step_ms": sum(parts[g]) + 0.5, "samples_per_s": g * 1024e3 / (sum(parts[g]) + 0.5),
                                         "parts_ms": {"lookup": parts[g][0], "all_to_all": parts[g][1], "dense": 0.5,
                                                      "allreduce": 0.0, "other": 0.0}},
                              "calibrated": {"step_ms": 4.0, "samples_per_s": g * 256e3}} for g in (8, 16, 64)]}
    return {"format": 1, "created": "2026-11-23", "command": "distrec bench --quick --out r", "mode": "quick",
            "options": {"models": ["demo"], "ranks": [1, 2], "strategies": ["planner"], "engines": ["sync"],
                        "repeats": 2, "steps": 20},
            "machine": {"cpu": "Test CPU 9000", "cores": 2, "memory_gb": 24.0, "gpus": []},
            "versions": {"torch": "2.13.0"}, "data": {}, "runs": runs, "projection": projection, "total_s": 100.0}


def test_report_headline_is_traceable_and_plots_exist(tmp_path):
    readme = write_report(results(), tmp_path).read_text()
    # distrec / TorchRec at 2 ranks: median 17,000 vs 8,000, with the runs it comes from
    assert "distrec sync / TorchRec DMP samples/s (planner, 2 ranks): 2.12**" in readme
    assert "`demo-sync-planner-r2-b2048-0`, `demo-sync-planner-r2-b2048-1`, `demo-torchrec-planner-r2-b2048-0`" in readme
    # the throughput ratio carries no AUC (20 batches: the PS has made W times the updates)
    assert "async PS (2 workers + 1 server) samples/s: 4.25** (17,000 vs 4,000 samples/s; runs" in readme
    assert "strong-scaling efficiency, sync planner, 2 ranks vs 1: 0.81**" in readme  # 17000 / 10500 / 2
    assert "weak-scaling efficiency" in readme and "0.94**" in readme  # 17000 / 9000 / 2
    assert "| demo | planner | 2 | 17,000 | 8,000 | 2.12 |" in readme  # the peer table, every matched config
    assert "Test CPU 9000, 2 cores" in readme and "torch 2.13.0" in readme
    assert "MODELLED" in readme and "| 64 | 8 |" in readme
    assert "| input_a2a | output_a2a | grad_a2a |" in readme  # the overlap table: in flight / waited / hidden
    assert "| demo-sync-planner-r2-b2048 | 4.0 / 3.0 / 1.0 | 6.0 / 2.5 / 3.5 | 5.0 / 0.5 / 4.5 |" in readme
    for name in ("throughput_vs_ranks", "step_breakdown", "auc_vs_samples", "estimate_vs_measured", "projection"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"]({name}.png)" in readme


def test_accuracy_runs_compare_sync_and_the_ps_at_the_same_samples(tmp_path):
    readme = write_report(results(), tmp_path).read_text()
    # sync's median AUC 0.75 minus the PS's: 2 workers -0.0050, 8 workers +0.0500; every run id cited
    assert ("AUC after 204,800 samples, sync (2 ranks) minus async PS: 2 workers -0.0050 (staleness 0.70), "
            "8 workers +0.0500 (staleness 5.50)**") in readme
    assert "`demo-sync-planner-r2-b2048-s100-0`, `demo-sync-planner-r2-b2048-s100-1`" in readme
    section = readme.split("## Sync vs async PS: accuracy at the same samples")[1].split("\n## ")[0]
    assert "| sync | 2 | 0.7500 | 0.0200 | 0.4000 | - | - | 10,000 | 20.5 |" in section
    assert "| async PS | 8 | 0.7000 | - | 0.4000 | 5.50 | 14.0 | 2,000 | 102.4 |" in section
    # the accuracy runs stay out of the throughput headline and tables that group by configuration
    assert "sync (2 ranks, planner) / async PS (2 workers + 1 server) samples/s: 4.25**" in readme
    png = tmp_path / "accuracy_vs_workers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](accuracy_vs_workers.png)" in readme


def test_projection_explains_where_the_curves_bend(tmp_path):
    readme = write_report(results(), tmp_path).read_text()
    assert ("- 8 -> 16 GPUs: the exchanges leave the node (50% of each GPU's all-to-all bytes cross the network, "
            "0% before, and the all-reduce runs at the network's speed); step 2.00 -> 3.00 ms, most of the change in "
            "the embedding all-to-alls (0.50 -> 1.50 ms)") in readme
    assert "- 16 -> 64 GPUs: more of the exchanges cross nodes (88% of each GPU's all-to-all bytes cross" in readme
    assert "| 8 | 1 | 2.00 | 4,096,000 | 1.00 / 0.50 / 0.00 / 0.50 / 0.00 |" in readme
    assert "measured rates (`calibration.json`" in readme  # structure, not the CPU's rates
    doc = results()
    del doc["projection"]["calibration"]["rates"]
    assert "measure the CPU more than the model" in write_report(doc, tmp_path / "b").read_text()


def test_full_sweep_adds_accuracy_runs_at_one_budget_and_quick_none():
    acc = [s for s in sweep(FULL) if s.purpose == "accuracy"]
    assert sorted({(s.engine, s.ranks) for s in acc}) == [("ps", 2), ("ps", 8), ("ps", 16), ("ps", 32), ("sync", 2)]
    assert {s.steps * s.global_batch for s in acc} == {100 * 2048} and {s.repeat for s in acc} == {0, 1, 2}
    assert all(s.key.endswith("-s100") for s in acc) and not [s for s in sweep(QUICK) if s.purpose == "accuracy"]


def test_failed_run_appears_as_failed(tmp_path):
    readme = write_report(results(), tmp_path).read_text()
    assert "| demo-horovod-planner-r2-b2048 | failed |" in readme
    assert "- `demo-horovod-planner-r2-b2048-0`: **failed**: exit code 1: Traceback" in readme


def test_report_command_redraws_from_stored_results(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(results()))
    out = run_cli("-m", "distrec", "bench", "report", str(tmp_path / "results.json"), "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "## Headline" in (tmp_path / "r" / "README.md").read_text()


def test_compare_shows_changes_and_runs_in_one_report_only(tmp_path):
    a, b = results(), copy.deepcopy(results())
    for r in b["runs"]:
        if r["key"] == "demo-torchrec-planner-r2-b2048":
            r["samples_per_s"] = 10_000.0  # +25 %
    b["runs"].append(run("sync", "row_wise", 2, sps=12_000))
    lines = compare(a, b)
    row = next(ln for ln in lines if ln.startswith("| demo-torchrec-planner-r2-b2048 |"))
    assert "| 8,000 | 10,000 | +25.0 % |" in row
    assert any(ln.startswith("| demo-sync-row_wise-r2-b2048 | absent | 12,000 |") for ln in lines)
    assert "only in B: demo-sync-row_wise-r2-b2048" in lines and "only in A: none" in lines
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = run_cli("-m", "distrec", "bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert out.returncode == 0 and "+25.0 %" in out.stdout, out.stderr
    missing = run_cli("-m", "distrec", "bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "distrec: error:" in missing.stderr


def test_the_bench_models_configs_are_found_from_the_repository_root():
    """The sweep's commands name configs relative to ROOT (a wrong ROOT broke every run at once)."""
    from distrec.tools.bench.matrix import MODELS
    from distrec.tools.bench.runner import ROOT

    assert (ROOT / "configs").is_dir() and (ROOT / "distrec").is_dir()
    assert all((ROOT / m.config).is_file() for m in MODELS.values())


def test_quick_sweep_is_small_and_keeps_budget_equal():
    specs = sweep(QUICK)
    assert len(specs) <= 12
    budgets = {(s.model, s.global_batch): s.steps * s.global_batch for s in specs}
    for s in specs:
        assert s.steps * s.global_batch == budgets[(s.model, s.global_batch)]
    assert {s.engine for s in specs} == {"sync", "torchrec", "ps", "horovod"}


def test_runner_one_real_run_and_a_failing_one(tmp_path, small_data):
    cfg, data = small_data
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "small").symlink_to(data)
    bench = Bench(tmp_path, QUICK, (0, 0), timeout_s=120, eval_rows=500, evals_per_run=1,
                  models={"small": ModelSpec("small", str(cfg), (), 256, True)})
    ok = bench.run_one(RunSpec("small", "sync", "row_wise", 1, 0, 256, 5))
    assert ok["status"] == "ok", ok.get("error")
    assert ok["samples_per_s"] > 0 and 0 < ok["auc"] < 1 and ok["peak_rss_bytes"][0] > 0
    assert set(ok["breakdown_ms"]) >= {"lookup", "input_a2a", "optimizer", "dense_fwd_bwd"}
    bad = bench.run_one(RunSpec("small", "sync", "no_such_sharding", 1, 0, 256, 5))
    assert bad["status"] == "failed" and "no_such_sharding" in bad["error"]


def test_profiling_changes_no_result(small_data, tmp_path):
    """--train.profile_steps only times the phases: the same loss trajectory and AUC as without it. (With
    it, --train.pipeline=true too: on one rank it is off, there being no exchange to hide.)"""
    cfg, data = small_data
    finals = []
    for profile in (0, 5):
        logs = tmp_path / f"p{profile}"
        out = run_cli("-m", "distrec.train", "--config", str(cfg), f"--data.path={data}", "--train.max_steps=5",
                      f"--train.profile_steps={profile}", f"--logging.dir={logs}", f"--train.pipeline={str(bool(profile)).lower()}")
        assert out.returncode == 0, out.stderr
        assert ("pipeline: off (one rank: no exchange to hide)" in out.stdout) == bool(profile)
        records = [json.loads(x) for x in (logs / "metrics.jsonl").read_text().splitlines()]
        finals.append([(r["kind"], r.get("loss"), r.get("auc")) for r in records if r["kind"] in ("train", "eval")])
        kinds = {r["kind"] for r in records}
        assert ("breakdown" in kinds) == bool(profile)
        for r in (r for r in records if r["kind"] == "breakdown"):
            assert "grad_a2a" in r["ms"] and set(r["overlap_ms"]) == {"input_a2a", "output_a2a", "grad_a2a"}
            for x in r["overlap_ms"].values():  # timings are not asserted, their relation is
                assert 0 <= x["waited"] <= x["in_flight"] and abs(x["hidden"] - (x["in_flight"] - x["waited"])) < 1e-9
    assert finals[0] == finals[1]


def test_a_restricted_sweep_says_no_ratio_was_requested(tmp_path):
    doc = results()
    doc["options"].update(engines=["sync"], ranks=[2])
    doc["runs"] = [r for r in doc["runs"] if r["engine"] == "sync" and r["ranks"] == 2]
    readme = write_report(doc, tmp_path).read_text()
    assert "No headline ratio: none was requested. This sweep ran engine(s) sync at rank count(s) 2" in readme
    assert "did not succeed" not in readme
