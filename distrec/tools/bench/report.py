"""README.md and the PNG plots of a benchmark report, from results.json alone (so a stored report can
be re-drawn and tested): ``distrec bench report RESULTS.json``.

    write_report(json.loads(Path("report/results.json").read_text()), Path("report"))

Every headline number names the run ids in results.json it comes from.
"""
from __future__ import annotations

from pathlib import Path

from distrec.tools.bench.plots import draw_all
from distrec.tools.bench.summary import Group, group_runs, headline


def write_report(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(doc["runs"])
    plots = draw_all(doc, groups, out)
    text = "\n".join([*header(doc), *headline_section(groups, doc.get("options", {})), *machine_section(doc),
                      *plots_section(plots),
                      *results_section(groups), *projection_section(doc), *failures_section(doc["runs"]),
                      *method_section(doc)])
    path = out / "README.md"
    path.write_text(text + "\n")
    return path


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def cite(ids: list[str]) -> str:
    return ", ".join(f"`{i}`" for i in ids)


def header(doc: dict) -> list[str]:
    o = doc["options"]
    n_ok = sum(r["status"] == "ok" for r in doc["runs"])
    return [f"# distrec scaling benchmark ({doc.get('mode', '?')} mode)", "",
            f"Generated {doc.get('created', '?')} by `{doc.get('command', 'distrec bench')}` in "
            f"{fmt(doc.get('total_s'))} s: {len(doc['runs'])} runs, {n_ok} ok. Models {', '.join(o['models'])}; "
            f"ranks {', '.join(map(str, o['ranks']))}; strategies {', '.join(o['strategies'])}; engines "
            f"{', '.join(o['engines'])}; {o['repeats']} repeat(s); {o['steps']} global batches per run (the same "
            "sample budget for every engine at a batch size). Numbers are medians over repeats; run ids "
            "(`model-engine-strategy-rRANKS-bBATCH-REPEAT`) refer to `runs` in [results.json](results.json).",
            *not_run_note(doc), ""]


def no_headline_reason(options: dict) -> str:
    """Every headline ratio compares two engines, or one engine at two rank counts."""
    engines, ranks = options.get("engines", []), options.get("ranks", [])
    if len(engines) < 2 and len(ranks) < 2:
        return (f"No headline ratio: none was requested. This sweep ran engine(s) {', '.join(engines) or '-'} at "
                f"rank count(s) {', '.join(map(str, ranks)) or '-'}, and every ratio compares two engines or two "
                "rank counts.")
    return "No headline ratio could be formed: the runs it needs did not succeed (see below)."


def not_run_note(doc: dict) -> list[str]:
    left = doc.get("not_run") or []
    if not left:
        return []
    first = [r for r in left if r.endswith("-0")]
    return [f"\nThe time budget (`--max-minutes`) ended the sweep before {len(left)} planned runs (`not_run` in "
            f"results.json): {len(left) - len(first)} later repeats and {len(first)} configurations never run"
            + (f" ({', '.join(first)})" if first else "") + "; the tables show the repeats that ran."]


def headline_section(groups: dict[str, Group], options: dict) -> list[str]:
    lines = ["## Headline", ""]
    items = headline(groups)
    if not items:
        return lines + [no_headline_reason(options), ""]
    for h in items:
        extra = f"; AUC {'+' if h['auc_delta'] >= 0 else ''}{h['auc_delta']:.4f} for sync" if "auc_delta" in h else ""
        lines.append(f"- **{h['name']}: {h['value']:.2f}** ({fmt(h['a_value'])} vs {fmt(h['b_value'])} samples/s"
                     f"{extra}; runs {cite(h['runs'])})")
    return lines + ["", *peer_table(groups)]


def peer_table(groups: dict[str, Group]) -> list[str]:
    """distrec sync / TorchRec for every configuration both ran: one ratio can be noise on a shared machine."""
    rows = []
    for g in groups.values():
        if g.spec["engine"] != "sync" or not g.ok:
            continue
        peer = groups.get(g.key.replace("-sync-", "-torchrec-", 1))
        if peer and peer.ok:
            a, b = g.median("samples_per_s"), peer.median("samples_per_s")
            rows.append(f"| {g.spec['model']} | {g.spec['strategy']} | {g.spec['ranks']} | {fmt(a)} | {fmt(b)} | "
                        f"{a / b:.2f} | {fmt(g.median('auc'), 4)} / {fmt(peer.median('auc'), 4)} | "
                        f"{cite(g.ids + peer.ids)} |")
    if not rows:
        return []
    return ["distrec sync vs TorchRec DMP, every configuration both ran (same model, data, plan, batch, steps):", "",
            "| model | strategy | ranks | distrec samples/s | TorchRec samples/s | ratio | AUC distrec / TorchRec "
            "| runs |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def machine_section(doc: dict) -> list[str]:
    m, v = doc.get("machine", {}), doc.get("versions", {})
    data = "; ".join(f"{k}: {d['train_rows']:,} train / {d['eval_rows']:,} eval rows (Bayes AUC "
                     f"{fmt(d.get('bayes_auc'), 4)})" for k, d in doc.get("data", {}).items())
    return ["## Machine, versions, commands", "",
            f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory_gb', '?')} GB; GPUs: "
            f"{', '.join(m.get('gpus') or []) or 'none'}; {m.get('os', '')}; git {m.get('git', '?')}",
            "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
            f"- Data (synthetic, `distrec data synth`): {data}",
            f"- Sweep: `{doc.get('command', '')}`; each run's exact command is its `command` in results.json "
            "and `runs/<run id>/cmd.txt`.", ""]


def plots_section(plots: dict[str, str]) -> list[str]:
    titles = {"throughput": "Throughput vs ranks (strong and weak scaling)", "breakdown": "Step-time breakdown",
              "auc": "AUC vs samples: sync vs async PS", "estimate": "Measured vs planner-estimated step time",
              "projection": "Projection to 8/16/64 H100s (modelled)"}
    lines = ["## Plots", ""]
    for key, name in plots.items():
        lines += [f"### {titles[key]}", "", f"![{titles[key]}]({name})", ""]
    return lines


def results_section(groups: dict[str, Group]) -> list[str]:
    lines = ["## All configurations", "",
             "| configuration | status | samples/s (median) | spread | AUC | logloss | step ms measured / est. "
             "| peak RSS per rank, max GB | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for g in groups.values():
        rss = [max(r["peak_rss_bytes"]) for r in g.ok if r.get("peak_rss_bytes")]
        spread = g.spread("samples_per_s")
        lines.append(f"| {g.key} | {g.status} | {fmt(g.median('samples_per_s'))} | "
                     f"{'-' if spread is None else f'{100 * spread:.0f} %'} | {fmt(g.median('auc'), 4)} | "
                     f"{fmt(g.median('logloss'), 4)} | {fmt(g.median('measured_step_ms'), 1)} / "
                     f"{fmt(g.median('estimated_step_ms'), 1)} | {fmt(max(rss) / 1e9 if rss else None, 2)} | "
                     f"{cite([r['run_id'] for r in g.runs])} |")
    return lines + ["", *breakdown_table(groups)]


def breakdown_table(groups: dict[str, Group]) -> list[str]:
    from distrec.tools.bench.plots import PHASE_ORDER, median_phase

    rows = [g for g in groups.values() if g.ok and all("breakdown_ms" in r for r in g.ok)]
    if not rows:
        return []
    lines = ["Step-time breakdown, ms per step:", "", "| configuration | " + " | ".join(PHASE_ORDER) + " | step |",
             "|---|" + "---|" * (len(PHASE_ORDER) + 1)]
    for g in rows:
        cells = [fmt(median_phase(g, p), 1) for p in (*PHASE_ORDER, "step")]
        lines.append(f"| {g.key} | " + " | ".join(cells) + " |")
    return lines + ["", *overlap_table(rows)]


def overlap_table(groups: list[Group]) -> list[str]:
    """Per exchange: ms per step in flight / waited for (exposed, in the breakdown) / hidden behind other work."""
    from distrec.tools.bench.plots import median_overlap
    from distrec.trainer.phases import EXCHANGES

    rows = [g for g in groups if all("overlap_ms" in r for r in g.ok)]
    if not rows:
        return []
    lines = ["All-to-all overlap, ms per step, in flight / waited / hidden (hidden = in flight - waited):", "",
             "| configuration | " + " | ".join(EXCHANGES) + " |", "|---|" + "---|" * len(EXCHANGES)]
    for g in rows:
        cells = [" / ".join(fmt(median_overlap(g, x, k), 1) for k in ("in_flight", "waited", "hidden"))
                 for x in EXCHANGES]
        lines.append(f"| {g.key} | " + " | ".join(cells) + " |")
    return lines + [""]


def projection_section(doc: dict) -> list[str]:
    p = doc.get("projection")
    if not p:
        return []
    cal = p["calibration"]
    lines = ["## Projection to 8, 16 and 64 H100 GPUs (MODELLED, not measured)", "",
             f"The planner's cost model (`{p['preset']}` preset, {p['gpus_per_node']} GPUs per node) on the "
             f"planner's own plan for the `{p['model']}` model, {p['points'][0]['batch_per_rank']} rows per GPU. "
             f"Calibrated with this run: lookup efficiency x {min(cal['lookup_ratio'], 1):.3f} and all-to-all "
             f"efficiency x {min(cal['comm_ratio'], 1):.3f}, the median estimated/measured ratios (capped at 1) of "
             f"the CPU runs {cite(cal['runs']) or '(none: preset numbers only)'}. Applying a CPU-over-loopback "
             "ratio to NVLink and InfiniBand assumes distrec loses the same share of the link there as here: read "
             "the calibrated column as a pessimistic bound and the preset column as the datasheet-based one.", "",
             "| GPUs | nodes | preset: ms/step | preset: samples/s | calibrated: ms/step | calibrated: samples/s |",
             "|---|---|---|---|---|---|"]
    for q in p["points"]:
        pre, cal_ = q.get("preset", {}), q.get("calibrated", {})
        lines.append(f"| {q['gpus']} | {q['nodes']} | {fmt(pre.get('step_ms'), 2)} | {fmt(pre.get('samples_per_s'))}"
                     f" | {fmt(cal_.get('step_ms'), 2)} | {fmt(cal_.get('samples_per_s'))} |")
    return lines + [""]


def failures_section(runs: list[dict]) -> list[str]:
    bad = [r for r in runs if r["status"] != "ok"]
    if not bad:
        return ["## Failed and skipped runs", "", "None.", ""]
    lines = ["## Failed and skipped runs", ""]
    for r in bad:
        first = (r.get("error") or "").strip().splitlines()
        lines.append(f"- `{r['run_id']}`: **{r['status']}**: {first[0] if first else ''}")
        if len(first) > 1:
            lines += ["  ```", *("  " + ln for ln in first[-6:]), "  ```"]
    return lines + [""]


def method_section(doc: dict) -> list[str]:
    return ["## How it was measured", "",
            "- Each run is its own processes (`torchrun`, `horovod.runner.launch --gloo`, `distrec ps`, or "
            "`torchrun -m distrec.tools.bench.torchrec_run`), one intra-op thread per process, with a timeout; a "
            "failed run is recorded and the sweep goes on.",
            "- samples/s: global samples over training wall time (evaluation left out), data loading included; "
            "TorchRec peer: slowest rank's training seconds. PS: the coordinator's count of samples pushed.",
            "- Breakdown (`--train.profile_steps`, sync engines): data wait (loader), input all-to-all (routing "
            "ids to their shards and the id exchange incl. its wait; at 1 rank only the routing), lookup (local "
            "pooled lookup of sharded tables, forward; replicated tables' lookups are in dense forward/backward), "
            "output all-to-all (forward), embedding-gradient all-to-all (backward), gradient "
            "all-reduce (DDP buckets call-to-completion, overlapping backward; plus data-parallel tables' "
            "all-reduce), optimizer (`step()` of dense and sparse optimizers; under Horovod it includes waiting "
            "for the gradient all-reduce), dense forward/backward = the rest of the step: MLPs, interaction, "
            "loss and the embeddings' fused row update in backward. An all-to-all's phase is its exposed time "
            "(starting it and waiting for it); the overlap table gives each one's time in flight, of which the rest of the "
            "step hid all but the wait (the bottom MLP and its backward run while the pooled vectors and their "
            "gradients fly; pipelined, the ids fly while the previous step trains).",
            "- Peak memory: `ru_maxrss` of each rank process (Python, torch, loader included).",
            "- Planner estimate: the `cpu` preset's step time for the plan each run used (the trainer's plan "
            "check; calibrated if `distrec plan --calibrate` rates were present).",
            "- Weak scaling: half the strong global batch per rank; at 2 ranks it is the strong-scaling run.",
            f"- Ranks beyond the machine's {doc.get('machine', {}).get('cores', '?')} cores share them: there the "
            "scaling numbers measure the engines' overhead under contention, not what more hardware would give "
            "(the projection is the model's answer to that).",
            "- Async PS: W workers each push updates from 1/W of every global batch, so for the same samples it "
            "makes W times as many, W times smaller, updates as sync: at a small sample budget that can favour "
            "its AUC (see docs/benchmarks.md for the same-updates comparison).",
            "- Other jobs share this machine: single runs can be off by tens of percent; compare medians and "
            "look at the spread where repeats ran.", ""]
