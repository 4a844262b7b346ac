"""One run's numbers from what it wrote: metrics.jsonl and the final line (distrec engines), or the
result file (TorchRec peer).

    parse_run(spec, Path("report/runs/demo-sync-planner-r2-b2048-0"), output_text)
    # {"samples_per_s": ..., "auc": ..., "logloss": ..., "eval_curve": [[samples, auc], ...],
    #  "breakdown_ms": {...}, "peak_rss_bytes": [...], "estimated_step_ms": ..., "measured_step_ms": ...}
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from distrec.tools.bench.matrix import RunSpec

FINAL = re.compile(r"final: step (\d+) \| auc ([\d.]+) \| logloss ([\d.]+) \| ([\d,.]+) samples/s")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def parse_run(spec: RunSpec, run_dir: Path, output: str) -> dict:
    if spec.engine == "torchrec":
        return parse_torchrec(spec, run_dir)
    recs = records(run_dir)
    out = {"eval_curve": eval_curve(spec, recs)}
    m = FINAL.search(output)
    if m:
        out.update(auc=float(m[2]), logloss=float(m[3]), samples_per_s=float(m[4].replace(",", "")))
        out["measured_step_ms"] = 1e3 * spec.global_batch / out["samples_per_s"]
    for r in recs:
        if r["kind"] == "plan_check":
            out.update(estimated_step_ms=r["estimated_step_ms"], plan_preset=r["preset"],
                       plan_calibrated=r["calibrated"], peak_rss_bytes=[x["peak_rss_bytes"] for x in r["ranks"]],
                       estimated_tables_bytes=[x["estimated_tables_bytes"] for x in r["ranks"]],
                       measured_tables_bytes=[x["measured_tables_bytes"] for x in r["ranks"]])
        elif r["kind"] == "breakdown":
            out.update(breakdown_ms=r["ms"], breakdown_steps=r["steps"])
            if "overlap_ms" in r:  # {exchange: {"in_flight", "waited", "hidden"}}
                out["overlap_ms"] = r["overlap_ms"]
        elif r["kind"] == "train" and "staleness_mean" in r:
            out.update(staleness_mean=r["staleness_mean"], staleness_p99=r.get("staleness_p99"))
    return out


def eval_curve(spec: RunSpec, recs: list[dict]) -> list[list[float]]:
    """[[samples trained, AUC], ...]; a PS step is one worker's push of 1/W of a global batch."""
    per_step = spec.global_batch / spec.ranks if spec.engine == "ps" else spec.global_batch
    return [[r["step"] * per_step, r["auc"]] for r in recs if r["kind"] == "eval"]


def parse_torchrec(spec: RunSpec, run_dir: Path) -> dict:
    path = run_dir / "torchrec.json"
    if not path.exists():
        return {}
    res = json.loads(path.read_text())
    return {"samples_per_s": res["samples_per_s"], "auc": res["auc"], "logloss": res["logloss"],
            "measured_step_ms": 1e3 * spec.global_batch / res["samples_per_s"],
            "peak_rss_bytes": res["peak_rss_bytes"], "eval_curve": [[spec.steps * spec.global_batch, res["auc"]]]}
