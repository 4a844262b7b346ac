"""The layout's rules, read from the source with ``ast``: no import cycle inside ``distrec`` or inside
``sharding`` (function-local imports and "module:function" strings handed to importlib count), and
``sharding`` never imports ``distrec``."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("distrec", "sharding")
MODULE_STRING = re.compile(r"^((?:distrec|sharding)(?:\.\w+)+):\w+$")  # "module:function", for importlib


def module_files() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, modules: dict) -> set[str]:
    """Every project module ``name`` imports, wherever the import statement stands."""
    out = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package, level dots up
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := MODULE_STRING.match(node.value)):
            targets = [m.group(1)]  # a "module:function" factory, loaded by importlib
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant):
            targets = [node.args[0].value]
        out |= {t for t in targets if t in modules and t != name}
    return out


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle_and_a_string_import(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = tmp_path / "m.py"
    src.write_text('def f():\n    from distrec.train import main\nSTEP = "distrec.config:load_config"\n'
                   'CMD = ["-m", "distrec.cli"]\n')
    known = {"distrec.train": None, "distrec.config": None, "distrec.cli": None}
    assert imports_of(src, "distrec.x", known) == {"distrec.train", "distrec.config"}  # not a command line


def test_no_import_cycles():
    edges = graph()
    for pkg in PACKAGES:
        inside = {m: {t for t in ts if t.split(".")[0] == pkg} for m, ts in edges.items() if m.split(".")[0] == pkg}
        assert cycles(inside) == [], f"import cycles in {pkg}/"


def test_sharding_never_imports_distrec():
    wrong = {m: sorted(t for t in ts if t.startswith("distrec")) for m, ts in graph().items()
             if m.startswith("sharding")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_nothing_imports_the_entry_point():
    assert sorted(m for m, ts in graph().items() if "distrec.train" in ts) == []


def test_the_planner_and_the_command_line_import_without_torch():
    """The cost model is plain Python (testable without running anything), and ``distrec ps`` must reach
    torch's first import itself to quiet its RPC warnings (distrec/cli.py)."""
    code = "import sys, sharding.planner, distrec.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
