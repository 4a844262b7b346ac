"""Runs grouped by configuration, medians and spread, and the headline ratios, from results.json only.

    groups = group_runs(doc["runs"])            # {key: Group}
    heads = headline(by_purpose(groups))        # [{"name", "value", "text", "runs": [run ids]}]
    acc = accuracy_rows(by_purpose(groups, "accuracy"))   # sync and async PS at the same samples
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Group:
    """Every repeat of one configuration."""

    key: str
    spec: dict  # model, engine, strategy, ranks, global_batch, steps of the first run
    runs: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "ok"]

    @property
    def ids(self) -> list[str]:
        return [r["run_id"] for r in self.ok]

    def median(self, name: str) -> float | None:
        values = [r[name] for r in self.ok if r.get(name) is not None]
        return statistics.median(values) if values else None

    def spread(self, name: str) -> float | None:
        """(max - min) / median over the repeats, or None with fewer than two."""
        values = [r[name] for r in self.ok if r.get(name) is not None]
        if len(values) < 2:
            return None
        return (max(values) - min(values)) / statistics.median(values)

    @property
    def status(self) -> str:
        if self.ok:
            return "ok" if len(self.ok) == len(self.runs) else f"ok {len(self.ok)}/{len(self.runs)}"
        return self.runs[0]["status"]


def group_runs(runs: list[dict]) -> dict[str, Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        spec = {k: r[k] for k in ("model", "engine", "strategy", "ranks", "global_batch", "steps")}
        spec["purpose"] = r.get("purpose", "speed")  # results.json from before the accuracy runs: all speed
        groups.setdefault(r["key"], Group(r["key"], spec)).runs.append(r)
    return groups


def by_purpose(groups: dict[str, Group], purpose: str = "speed") -> dict[str, Group]:
    """The throughput sweep's groups (default) or the accuracy runs' (``"accuracy"``)."""
    return {k: g for k, g in groups.items() if g.spec["purpose"] == purpose}


def accuracy_rows(groups: dict[str, Group]) -> list[dict]:
    """One row per accuracy configuration, sync first then the PS by workers: medians over repeats of
    AUC, logloss, staleness and samples/s, at the same samples (steps x global batch)."""
    rows = []
    for g in sorted(groups.values(), key=lambda g: (g.spec["engine"] != "sync", g.spec["ranks"])):
        if not g.ok:
            continue
        rows.append({"key": g.key, "engine": g.spec["engine"], "ranks": g.spec["ranks"], "runs": g.ids,
                     "samples": g.spec["steps"] * g.spec["global_batch"], "repeats": len(g.ok),
                     **{m: g.median(m) for m in ("auc", "logloss", "staleness_mean", "staleness_p99",
                                                 "samples_per_s")},
                     "auc_spread": (max(r["auc"] for r in g.ok) - min(r["auc"] for r in g.ok)) if len(g.ok) > 1
                     else None})
    return rows


def find(groups: dict[str, Group], **want) -> Group | None:
    """The group whose spec has all of ``want`` and at least one successful run."""
    for g in groups.values():
        if all(g.spec.get(k) == v for k, v in want.items()) and g.ok:
            return g
    return None


def strong_batch(groups: dict[str, Group], model: str) -> int | None:
    """The model's strong-scaling global batch: the one its non-sync engines ran with."""
    batches = [g.spec["global_batch"] for g in groups.values() if g.spec["model"] == model and g.spec["engine"] != "sync"]
    batches = batches or [g.spec["global_batch"] for g in groups.values() if g.spec["model"] == model]
    return max(set(batches), key=batches.count) if batches else None


def models(groups: dict[str, Group]) -> list[str]:
    return sorted({g.spec["model"] for g in groups.values()}, key=lambda m: (m != "demo", m))


def max_ranks(groups: dict[str, Group], model: str, engine: str) -> int | None:
    ranks = [g.spec["ranks"] for g in groups.values() if g.spec["model"] == model and g.spec["engine"] == engine and g.ok]
    return max(ranks) if ranks else None


def plural(n: int | None, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def ratio_item(name: str, a: Group | None, b: Group | None, metric: str = "samples_per_s") -> dict | None:
    if a is None or b is None or not a.median(metric) or not b.median(metric):
        return None
    value = a.median(metric) / b.median(metric)
    return {"name": name, "value": value, "a": a.key, "b": b.key, "a_value": a.median(metric),
            "b_value": b.median(metric), "runs": a.ids + b.ids}


def headline(groups: dict[str, Group]) -> list[dict]:
    """The ratios that matter, per model, each with the run ids it comes from."""
    out = []
    for model in models(groups):
        batch = strong_batch(groups, model)
        out += [x for x in (vs_torchrec(groups, model, batch), vs_ps(groups, model, batch),
                            strong_efficiency(groups, model, batch), weak_efficiency(groups, model, batch)) if x]
    return out


def vs_torchrec(groups, model: str, batch: int) -> dict | None:
    for strategy in ("planner", "row_wise", "table_wise", "data_parallel"):
        n = max_ranks(groups, model, "torchrec")
        common = dict(model=model, strategy=strategy, ranks=n, global_batch=batch)
        item = ratio_item(f"{model}: distrec sync / TorchRec DMP samples/s ({strategy}, {plural(n, 'rank')})",
                          find(groups, engine="sync", **common), find(groups, engine="torchrec", **common))
        if item:
            return item
    return None


def vs_ps(groups, model: str, batch: int) -> dict | None:
    n = max_ranks(groups, model, "ps")
    sync = find(groups, model=model, engine="sync", strategy="planner", ranks=n, global_batch=batch)
    name = f"{model}: sync ({plural(n, 'rank')}, planner) / async PS ({plural(n, 'worker')} + 1 server) samples/s"
    # No AUC here: after the throughput runs' few global batches the PS has made W times as many updates;
    # accuracy is compared at the same samples well past the start (accuracy_rows).
    return ratio_item(name, sync, find(groups, model=model, engine="ps", ranks=n, global_batch=batch))


def strong_efficiency(groups, model: str, batch: int) -> dict | None:
    n = max_ranks(groups, model, "sync")
    one = find(groups, model=model, engine="sync", strategy="planner", ranks=1, global_batch=batch)
    top = find(groups, model=model, engine="sync", strategy="planner", ranks=n, global_batch=batch)
    item = ratio_item(f"{model}: strong-scaling efficiency, sync planner, {n} ranks vs 1", top, one)
    if item and n:
        item["value"] /= n
    return item if item and n and n > 1 else None


def weak_efficiency(groups, model: str, batch: int) -> dict | None:
    n = max_ranks(groups, model, "sync")
    if not n or n < 2:
        return None
    per_rank = batch // 2
    one = find(groups, model=model, engine="sync", strategy="planner", ranks=1, global_batch=per_rank)
    top = find(groups, model=model, engine="sync", strategy="planner", ranks=n, global_batch=per_rank * n)
    item = ratio_item(f"{model}: weak-scaling efficiency, sync planner, {per_rank} rows per rank, {n} ranks vs 1",
                      top, one)
    if item:
        item["value"] /= n
    return item
