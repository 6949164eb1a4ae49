"""The package map of DESIGN.md, checked on the source: what may import what."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moeload"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
    return out


def test_nothing_inside_the_package_imports_the_package_root() -> None:
    bad = [f"{p.relative_to(PKG.parent)}:{line}" for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG
           for line, mod, _ in _imports(p) if mod == "moeload"]
    assert bad == [], bad


def test_trace_imports_nothing_of_moeload_but_itself_and_errors() -> None:
    bad = [f"{p.name}:{line} {mod}" for p in (PKG / "trace").rglob("*.py") for line, mod, _ in _imports(p)
           if mod.startswith("moeload.") and not mod.startswith(("moeload.trace", "moeload.errors", "moeload._version"))]
    assert bad == [], bad


def test_analysis_packages_do_not_import_tracing_or_torch_at_import_time() -> None:
    code = ("import sys; import moeload.states, moeload.predictors, moeload.evaluation, moeload.placement, "
            "moeload.advise; bad = [m for m in ('torch', 'moeload.tracing') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_leaf_modules_import_nothing_of_moeload() -> None:
    """errors, _version and _balance sit below every package (each may import them)."""
    bad = [f"{name}:{line} {mod}" for name in ("errors.py", "_version.py", "_balance.py")
           for line, mod, _ in _imports(PKG / name) if mod.startswith("moeload")]
    assert bad == [], bad


def test_recording_imports_no_analysis_or_action() -> None:
    """moeload.tracing records; the packages that analyse (states, predictors, evaluation, placement, advise)
    and act (online, act) sit above it, so it imports none of them (DESIGN.md's package map)."""
    above = ("moeload.states", "moeload.predictors", "moeload.evaluation", "moeload.placement", "moeload.advise",
             "moeload.act", "moeload.online", "moeload.cli", "moeload.plots")
    bad = [f"{p.relative_to(PKG)}:{line} {mod}" for p in (PKG / "tracing").rglob("*.py") for line, mod, _ in _imports(p)
           if mod.startswith(above)]
    assert bad == [], bad
