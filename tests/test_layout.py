"""The package's shape: no import circles, the engine behind one door, the CLI away from torch."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "isokl_tl"
GROUND = {"isokl_tl.hooks", "isokl_tl.tokens"}      # what the engine may use of the rest of the package


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Every isokl_tl module or package named by an import in `path` (`from a import b` names a.b
    when that is a module, else a)."""
    mods, out = _modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("isokl_tl"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in mods else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("isokl_tl")}
    return out


def test_no_import_circles():
    mods = _modules()
    packages = {m for m, p in mods.items() if p.name == "__init__.py"}
    graph = {m: {d for d in _imports(p) if d in mods and d not in packages} - {m} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import circle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_science_uses_the_engine_through_its_public_names_only():
    for mod, path in _modules().items():
        if mod.startswith("isokl_tl.engine"):
            continue
        inner = sorted(d for d in _imports(path) if d.startswith("isokl_tl.engine."))
        assert not inner, f"{mod} imports engine internals {inner}; use `from isokl_tl.engine import ...`"


def test_the_engine_never_imports_the_science():
    for mod, path in _modules().items():
        if not mod.startswith("isokl_tl.engine"):
            continue
        outside = sorted(d for d in _imports(path) if not d.startswith("isokl_tl.engine") and d not in GROUND)
        assert not outside, f"{mod} imports {outside}: the engine may only use {sorted(GROUND)}"


def test_the_command_line_starts_without_importing_the_library():
    code = ("import sys; from isokl_tl_cli import main; "
            "heavy = [m for m in ('torch', 'transformer_lens', 'isokl_tl') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plots_leave_the_global_matplotlib_and_seaborn_settings_alone():
    code = """
import matplotlib, numpy as np
before = dict(matplotlib.rcParams)
from isokl_tl import kaplan_meier, plot_survival
ax = plot_survival({0.0: kaplan_meier(time=np.array([4, 8]), event=np.array([True, False]))})
after = dict(matplotlib.rcParams)
changed = sorted(k for k in before if before[k] != after[k])
assert not changed, changed
assert ax.get_title().startswith("Kaplan-Meier")
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={"MPLBACKEND": "Agg", "PATH": ""})
