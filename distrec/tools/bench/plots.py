"""The report's PNG plots (matplotlib, Agg), drawn from results.json only.

    draw_all(doc, groups, Path("report"))    # -> {"throughput": "throughput_vs_ranks.png", ...}
"""
from __future__ import annotations

from pathlib import Path

from distrec.tools.bench.summary import Group, models, strong_batch

ENGINE_LABEL = {"sync": "distrec sync (torchrun)", "horovod": "distrec + Horovod", "torchrec": "TorchRec DMP",
                "ps": "async PS (CPU)"}
PHASE_ORDER = ("data_wait", "input_a2a", "lookup", "output_a2a", "dense_fwd_bwd", "grad_a2a", "grad_allreduce",
               "optimizer")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    pyplot().close(fig)
    return name


def series(groups: dict[str, Group], model: str, engine: str, batch_of) -> list[tuple[int, float]]:
    """(ranks, median samples/s) of the engine's main strategy, ``batch_of(ranks)`` rows per step."""
    strategy = "hash" if engine == "ps" else "planner"
    pts = [(g.spec["ranks"], g.median("samples_per_s")) for g in groups.values()
           if g.spec["model"] == model and g.spec["engine"] == engine and g.spec["strategy"] == strategy
           and g.spec["global_batch"] == batch_of(g.spec["ranks"]) and g.ok]
    return sorted(pts)


def throughput(groups: dict[str, Group], out: Path) -> str:
    plt = pyplot()
    names = models(groups)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 3.6 * len(names)), squeeze=False)
    for row, model in zip(axes, names):
        batch = strong_batch(groups, model)
        for engine, label in ENGINE_LABEL.items():
            pts = series(groups, model, engine, lambda n: batch)
            if pts:
                row[0].plot(*zip(*pts), marker="o", label=label)
        weak = series(groups, model, "sync", lambda n: batch // 2 * n)
        if weak:
            row[1].plot(*zip(*weak), marker="o", label=ENGINE_LABEL["sync"])
            row[1].plot([p[0] for p in weak], [weak[0][1] * p[0] / weak[0][0] for p in weak], "k:", label="linear")
        row[0].set_title(f"{model}: strong scaling, global batch {batch}")
        row[1].set_title(f"{model}: weak scaling, {batch // 2} rows per rank")
        for ax in row:
            ax.set_xticks(sorted({g.spec["ranks"] for g in groups.values() if g.spec["model"] == model}))
            axis_labels(ax, "ranks", "samples/s (median)")
    return save(fig, out, "throughput_vs_ranks.png")


def axis_labels(ax, x: str, y: str, legend_size: int = 7) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=legend_size)


def breakdown(groups: dict[str, Group], out: Path) -> str:
    plt = pyplot()
    rows = [g for g in groups.values() if g.ok and g.spec["engine"] in ("sync", "horovod")
            and all("breakdown_ms" in r for r in g.ok)]
    fig, ax = plt.subplots(figsize=(10, 0.4 * max(len(rows), 4) + 1.5))
    for i, g in enumerate(rows):
        left = 0.0
        for j, phase in enumerate(PHASE_ORDER):
            ms = median_phase(g, phase)
            ax.barh(i, ms, left=left, color=f"C{j}", label=phase if i == 0 else None)
            left += ms
    ax.set_yticks(range(len(rows)), [g.key for g in rows], fontsize=7)
    ax.set_xlabel("ms per step (median over repeats, mean over profiled steps and ranks)")
    ax.set_title("step-time breakdown (sync engines)")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, out, "step_breakdown.png")


def median_overlap(g: Group, exchange: str, field: str) -> float:
    """The median over repeats of one exchange's "in_flight", "waited" or "hidden" ms per step."""
    values = sorted(r["overlap_ms"].get(exchange, {}).get(field, 0.0) for r in g.ok)
    return values[len(values) // 2]


def median_phase(g: Group, phase: str) -> float:
    values = sorted(r["breakdown_ms"].get(phase, 0.0) for r in g.ok)
    return values[len(values) // 2]


def auc_curves(groups: dict[str, Group], out: Path) -> str:
    plt = pyplot()
    names = models(groups)
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, model in zip(axes[0], names):
        batch = strong_batch(groups, model)
        for g in groups.values():
            s = g.spec
            if s["model"] == model and s["global_batch"] == batch and g.ok and (
                    s["engine"] == "ps" or (s["engine"] == "sync" and s["strategy"] == "planner")):
                curve = g.ok[0].get("eval_curve") or []
                if curve:
                    ax.plot(*zip(*curve), marker="o", label=f"{ENGINE_LABEL[s['engine']]}, {s['ranks']} ranks "
                                                           f"({g.ok[0]['run_id']})")
        ax.set_title(f"{model}: AUC vs samples trained")
        axis_labels(ax, "samples", "AUC (eval split)", legend_size=6)
    return save(fig, out, "auc_vs_samples.png")


def estimate_vs_measured(groups: dict[str, Group], out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pts = [(g.median("estimated_step_ms"), g.median("measured_step_ms"), g) for g in groups.values()
           if g.ok and g.median("estimated_step_ms") and g.median("measured_step_ms")]
    for i, engine in enumerate(("sync", "horovod")):
        sel = [(e, m) for e, m, g in pts if g.spec["engine"] == engine]
        if sel:
            ax.scatter(*zip(*sel), label=ENGINE_LABEL[engine], color=f"C{i}")
    top = max([max(e, m) for e, m, _ in pts], default=1.0) * 1.1
    ax.plot([0, top], [0, top], "k:", label="estimate = measured")
    ax.set_xlabel("planner estimate, ms per step (cpu preset)")
    ax.set_ylabel("measured ms per step")
    ax.set_title("measured vs planner-estimated step time")
    ax.legend(fontsize=7)
    return save(fig, out, "estimate_vs_measured.png")


def projection(doc: dict, groups: dict[str, Group], out: Path) -> str:
    plt = pyplot()
    proj = doc.get("projection") or {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    model = proj.get("model")
    if model:
        batch = strong_batch(groups, model)
        weak = series(groups, model, "sync", lambda n: batch // 2 * n)
        if weak:
            ax.plot(*zip(*weak), marker="o", label=f"measured: {model}, CPU ranks (this machine)")
        for name, style in (("calibrated", "s--"), ("preset", "^:")):
            pts = [(p["gpus"], p[name]["samples_per_s"]) for p in proj["points"] if "samples_per_s" in p.get(name, {})]
            if pts:
                ax.plot(*zip(*pts), style, label=f"MODELLED: H100 ({name} cost model)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks / GPUs")
    ax.set_ylabel("samples/s")
    ax.set_title("projection (modelled, planner cost model) beside measured points")
    ax.legend(fontsize=7)
    return save(fig, out, "projection.png")


def accuracy_curves(groups: dict[str, Group], out: Path) -> str | None:
    """The accuracy runs: AUC against samples (each configuration's first repeat), and the final AUC and
    mean staleness against the PS's workers beside sync."""
    if not any(g.ok for g in groups.values()):
        return None
    plt = pyplot()
    fig, (curves, by_w) = plt.subplots(1, 2, figsize=(11, 3.8))
    ps = sorted((g for g in groups.values() if g.ok and g.spec["engine"] == "ps"), key=lambda g: g.spec["ranks"])
    for g in sorted((g for g in groups.values() if g.ok), key=lambda g: (g.spec["engine"] != "sync", g.spec["ranks"])):
        unit = "ranks" if g.spec["engine"] == "sync" else "workers"
        curve = g.ok[0].get("eval_curve") or []
        if curve:
            curves.plot(*zip(*curve), marker="o", label=f"{ENGINE_LABEL[g.spec['engine']]}, {g.spec['ranks']} {unit}")
    axis_labels(curves, "samples", "AUC (eval split)", legend_size=6)
    curves.set_title("AUC vs samples trained, same global batch")
    if ps:
        by_w.plot([g.spec["ranks"] for g in ps], [g.median("auc") for g in ps], "o-", label="async PS: AUC")
        for g in groups.values():
            if g.ok and g.spec["engine"] == "sync":
                by_w.axhline(g.median("auc"), color="C1", ls="--", label=f"sync, {g.spec['ranks']} ranks: AUC")
        stale = by_w.twinx()
        stale.plot([g.spec["ranks"] for g in ps], [g.median("staleness_mean") or 0 for g in ps], "s:", color="C2",
                   label="async PS: mean staleness")
        stale.set_ylabel("mean staleness (pushes)")
        by_w.set_xscale("log", base=2)
        axis_labels(by_w, "PS workers", "final AUC", legend_size=6)
        by_w.set_title("final AUC and staleness vs workers")
    return save(fig, out, "accuracy_vs_workers.png")


def draw_all(doc: dict, groups: dict[str, Group], out: Path, accuracy: dict[str, Group] | None = None) -> dict:
    plots = {"throughput": throughput(groups, out), "breakdown": breakdown(groups, out),
             "auc": auc_curves(groups, out), "estimate": estimate_vs_measured(groups, out),
             "projection": projection(doc, groups, out)}
    drawn = accuracy_curves(accuracy or {}, out)
    return {**plots, "accuracy": drawn} if drawn else plots
