"""``distrec bench compare A B``: two reports' results.json side by side, per configuration.

    distrec bench compare docs/report/results.json report/results.json

For every configuration key in either report: median samples/s, AUC and measured step ms in A and B
and B's relative change; configurations present in only one report are listed as such.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from distrec.tools.bench.summary import Group, group_runs

METRICS = (("samples_per_s", "samples/s", 0), ("auc", "AUC", 4), ("measured_step_ms", "step ms", 1))


def load(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no results.json there")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a results.json ({e})") from e


def change(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    return f"{100 * (b / a - 1):+.1f} %" if a else "-"


def cell(g: Group | None, name: str, digits: int) -> str:
    if g is None:
        return "absent"
    value = g.median(name)
    return g.status if value is None else f"{value:,.{digits}f}"


def compare(a: dict, b: dict) -> list[str]:
    ga, gb = group_runs(a["runs"]), group_runs(b["runs"])
    head = "| configuration | " + " | ".join(f"{label} A | {label} B | change" for _, label, _ in METRICS) + " |"
    lines = [head, "|---|" + "---|" * (3 * len(METRICS))]
    for key in [*ga, *(k for k in gb if k not in ga)]:
        x, y = ga.get(key), gb.get(key)
        cells = []
        for name, _, digits in METRICS:
            cells += [cell(x, name, digits), cell(y, name, digits),
                      change(x.median(name) if x else None, y.median(name) if y else None)]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    only_a, only_b = [k for k in ga if k not in gb], [k for k in gb if k not in ga]
    lines += ["", f"only in A: {', '.join(only_a) or 'none'}", f"only in B: {', '.join(only_b) or 'none'}"]
    return lines


def main(paths: list[str]) -> int:
    if len(paths) != 2:
        raise ValueError("usage: distrec bench compare A B (results.json files or report folders)")
    a, b = load(paths[0]), load(paths[1])
    print(f"A: {paths[0]} ({a.get('created', '?')}, {a.get('mode', '?')})\n"
          f"B: {paths[1]} ({b.get('created', '?')}, {b.get('mode', '?')})\n")
    print("\n".join(compare(a, b)))
    sys.stdout.flush()
    return 0
