"""README.md and the PNG plots of a benchmark report, from results.json alone (so a stored report can
be re-drawn and tested): ``distrec bench report RESULTS.json``.

    write_report(json.loads(Path("report/results.json").read_text()), Path("report"))

Every headline number names the run ids in results.json it comes from.
"""
from __future__ import annotations

from pathlib import Path

from distrec.tools.bench.plots import draw_all
from distrec.tools.bench.summary import Group, accuracy_rows, by_purpose, group_runs, headline


def write_report(doc: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    every = group_runs(doc["runs"])
    groups, accuracy = by_purpose(every), accuracy_rows(by_purpose(every, "accuracy"))
    plots = draw_all(doc, groups, out, by_purpose(every, "accuracy"))
    text = "\n".join([*header(doc), *headline_section(groups, doc.get("options", {}), accuracy),
                      *machine_section(doc), *plots_section(plots), *accuracy_section(accuracy),
                      *results_section(every), *projection_section(doc), *failures_section(doc["runs"]),
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
            "(`model-engine-strategy-rRANKS-bBATCH-REPEAT`) refer to `runs` in [results.json](results.json)."
            + accuracy_note(o), *not_run_note(doc), ""]


def accuracy_note(o: dict) -> str:
    workers, steps = o.get("accuracy_workers"), o.get("accuracy_steps")
    if not workers or not steps:
        return ""
    return (f" Accuracy runs (ids with `-s{steps}`): sync on 2 ranks and the async PS on "
            f"{', '.join(map(str, workers))} workers, {steps} global batches each.")


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


def headline_section(groups: dict[str, Group], options: dict, accuracy: list[dict]) -> list[str]:
    lines = ["## Headline", ""]
    items, accuracy_lines = headline(groups), accuracy_headline(accuracy)
    if not items and not accuracy_lines:
        return lines + [no_headline_reason(options), ""]
    for h in items:
        lines.append(f"- **{h['name']}: {h['value']:.2f}** ({fmt(h['a_value'])} vs {fmt(h['b_value'])} samples/s; "
                     f"runs {cite(h['runs'])})")
    return lines + accuracy_lines + ["", *peer_table(groups)]


def accuracy_headline(rows: list[dict]) -> list[str]:
    """AUC of sync against the PS at each worker count, after the same samples."""
    sync = next((r for r in rows if r["engine"] == "sync"), None)
    ps = [r for r in rows if r["engine"] == "ps"]
    if sync is None or not ps or sync["auc"] is None:
        return []
    deltas = ", ".join(f"{r['ranks']} workers {sync['auc'] - r['auc']:+.4f} (staleness {fmt(r['staleness_mean'], 2)})"
                       for r in ps if r["auc"] is not None)
    return [f"- **AUC after {sync['samples']:,} samples, sync ({sync['ranks']} ranks) minus async PS: {deltas}** "
            f"(sync AUC {sync['auc']:.4f}; runs {cite(sync['runs'] + [i for r in ps for i in r['runs']])}; "
            "see [accuracy](#sync-vs-async-ps-accuracy-at-the-same-samples))"]


def accuracy_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    sync = next((r for r in rows if r["engine"] == "sync"), None)
    lines = ["## Sync vs async PS: accuracy at the same samples", "",
             f"Every run trains {rows[0]['samples']:,} samples (about an epoch of the training split) at the same "
             "global batch: sync on its ranks with the planner's plan, the PS with W workers each pushing updates "
             "from 1/W of every global batch to one server. Worker processes share the machine's cores, so their "
             "speed here is no guide to a cluster's; staleness (how many other workers' pushes landed between a "
             "worker's pull and its push) is what decides accuracy, and it grows with W. Medians over repeats; "
             "AUC spread = max - min over the repeats.", "",
             "| engine | ranks / workers | AUC | AUC spread | logloss | staleness mean | staleness p99 | samples/s "
             "| seconds to these samples | runs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        seconds = r["samples"] / r["samples_per_s"] if r["samples_per_s"] else None
        lines.append(f"| {'sync' if r['engine'] == 'sync' else 'async PS'} | {r['ranks']} | {fmt(r['auc'], 4)} | "
                     f"{fmt(r['auc_spread'], 4)} | {fmt(r['logloss'], 4)} | {fmt(r['staleness_mean'], 2)} | "
                     f"{fmt(r['staleness_p99'], 1)} | {fmt(r['samples_per_s'])} | {fmt(seconds, 1)} | "
                     f"{cite(r['runs'])} |")
    if sync and sync["samples_per_s"]:
        seconds = sync["samples"] / sync["samples_per_s"]
        lines += ["", f"At equal wall-clock time: sync reaches its AUC in {seconds:.1f} s of training; a PS row's "
                      "seconds say how long the same samples took it on these cores (more workers than cores "
                      "time-share them)."]
    return lines + [""]


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
              "auc": "AUC vs samples: sync vs async PS (throughput runs: the start of training)",
              "estimate": "Measured vs planner-estimated step time",
              "projection": "Projection to 8/16/64 H100s (modelled)",
              "accuracy": "Accuracy runs: AUC vs samples, and vs the PS's workers"}
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
    cal, batch = p["calibration"], p["points"][0]["batch_per_rank"]
    lines = ["## Projection to 8, 16 and 64 H100 GPUs (MODELLED, not measured)", "",
             f"The planner's cost model (`{p['preset']}` preset, {p['gpus_per_node']} GPUs per node) on the "
             f"planner's own plan for the `{p['model']}` model at {batch} rows per GPU: weak scaling, so samples/s "
             f"= GPUs x {batch} / step time. {calibration_text(cal)}", "",
             "| GPUs | nodes | preset: ms/step | preset: samples/s | preset: lookup / all-to-all / all-reduce / "
             "dense / other ms | calibrated: ms/step | calibrated: samples/s | calibrated: lookup / all-to-all / "
             "all-reduce / dense / other ms |",
             "|---|---|---|---|---|---|---|---|"]
    for q in p["points"]:
        pre, cal_ = q.get("preset", {}), q.get("calibrated", {})
        lines.append(f"| {q['gpus']} | {q['nodes']} | {fmt(pre.get('step_ms'), 2)} | {fmt(pre.get('samples_per_s'))} | "
                     f"{parts_text(pre)} | {fmt(cal_.get('step_ms'), 2)} | {fmt(cal_.get('samples_per_s'))} | "
                     f"{parts_text(cal_)} |")
    return lines + ["", *shape_text(p["points"], p["gpus_per_node"]), ""]


def calibration_text(cal: dict) -> str:
    ratios = (f"lookup x {min(cal['lookup_ratio'], 1):.3f}, all-to-all x {min(cal['comm_ratio'], 1):.3f} (the median "
              f"estimated / measured ratios of the CPU runs {cite(cal['runs']) or '(none)'}, capped at 1)")
    if cal.get("rates"):
        return ("The calibrated curve carries over how far the model's structure was off on this machine, not the "
                "CPU's speed: the CPU estimates use this machine's measured rates (`calibration.json`, `distrec plan "
                f"--calibrate`), so a ratio near 1 says the model counts what the runtime does; the H100 efficiencies "
                f"are multiplied by them: {ratios}.")
    return ("No measured rates were kept with this report, so the calibrated curve's ratios compare the `cpu` "
            "preset's assumed rates with this machine: they measure the CPU more than the model, and the calibrated "
            f"curve is a pessimistic bound ({ratios}); the preset curve is the datasheet-based one.")


PARTS = ("lookup", "all_to_all", "allreduce", "dense", "other")
PART_NAMES = {"lookup": "the lookup", "all_to_all": "the embedding all-to-alls",
              "allreduce": "the replicated tables' all-reduce", "dense": "the dense part (MLPs, their all-reduce)",
              "other": "the fixed per-step cost"}


def parts_text(point: dict) -> str:
    parts = point.get("parts_ms")
    if not parts:
        return point.get("error", "-")
    return " / ".join(f"{parts[k]:.2f}" for k in PARTS)


def off_node(point: dict, per_node: int) -> float:
    """The share of a GPU's all-to-all bytes that go to other nodes: (W - G) / W."""
    return max(point["gpus"] - per_node, 0) / point["gpus"]


def calibrated_gain(a: dict, b: dict) -> str:
    x, y = a.get("calibrated", {}).get("samples_per_s"), b.get("calibrated", {}).get("samples_per_s")
    return f"{y / x:.2f}" if x and y else "-"


def shape_text(points: list[dict], per_node: int) -> list[str]:
    """Why each curve bends: which part of the step grows from one size to the next, and where the
    exchanges leave the node."""
    ok = [q for q in points if "parts_ms" in q.get("preset", {})]
    if len(ok) < 2:
        return []
    out = []
    for a, b in zip(ok, ok[1:]):
        pa, pb = a["preset"], b["preset"]
        grew = max(PARTS, key=lambda k: pb["parts_ms"][k] - pa["parts_ms"][k])
        leave = "the exchanges leave the node" if a["nodes"] == 1 else "more of the exchanges cross nodes"
        where = (f"{leave} ({off_node(b, per_node):.0%} of each GPU's all-to-all bytes cross the network, "
                 f"{off_node(a, per_node):.0%} before, "
                 "and the all-reduce runs at the network's speed)" if b["nodes"] > a["nodes"]
                 else "the exchanges stay on NVLink")
        gain = pb["samples_per_s"] / pa["samples_per_s"]
        out.append(f"- {a['gpus']} -> {b['gpus']} GPUs: {where}; step {pa['step_ms']:.2f} -> {pb['step_ms']:.2f} ms, "
                   f"most of the change in {PART_NAMES[grew]} ({pa['parts_ms'][grew]:.2f} -> "
                   f"{pb['parts_ms'][grew]:.2f} ms), so samples/s grows x{gain:.2f} for x{b['gpus'] / a['gpus']:.0f} "
                   f"the GPUs (calibrated: x{calibrated_gain(a, b)}).")
    top = max(PARTS, key=lambda k: ok[0]["preset"]["parts_ms"][k])
    return ["Why the curves bend (preset numbers; weak scaling, so every GPU does the same lookups per step and "
            "what grows is what crosses GPUs):", "", *out, "",
            f"At {ok[0]['gpus']} GPUs the largest part of the step is {PART_NAMES[top]} "
            f"({ok[0]['preset']['parts_ms'][top]:.2f} of {ok[0]['preset']['step_ms']:.2f} ms); the calibrated curve "
            "has the preset's shape where its ratios are near 1, and falls further wherever the all-to-all "
            "ratio is low (a slow exchange costs more the more of it crosses nodes)."]


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
            "makes W times as many, W times smaller, updates as sync: after the throughput runs' few batches "
            "that favours its AUC, so accuracy is compared only in the accuracy runs (about an epoch each).",
            "- Other jobs share this machine: single runs can be off by tens of percent; compare medians and "
            "look at the spread where repeats ran.", ""]
