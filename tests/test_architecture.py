"""The layering of docs/architecture.md, checked on the source: numerics <- capabilities <- app <- cli.

Read from the import statements of every module (including imports inside functions), so a lazy import
cannot slip past. Also: importing the library and drawing a plot leaves matplotlib's backend alone.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import leantrain

ROOT = Path(leantrain.__file__).parent
CAPABILITIES = {"precision", "quant", "optim", "landscape", "distributed", "imitation"}
SHARED = {"data", "models", "train", "storage", "validation", "plots", "seeds"}
ENTRY = {"cli", "__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of leantrain in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "leantrain"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] == "leantrain":
                found.append((mod, [a.name for a in node.names], node.lineno))
    return found


def _top(name: str) -> str:
    """The top-level part of leantrain a module belongs to ("numerics", "app", "train", ...)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        src = _module_name(path)
        for mod, names, line in _imports(path):
            targets = [mod] + [f"{mod}.{n}" for n in names if _is_module(f"{mod}.{n}")]
            for t in targets:
                yield src, t, names, f"{path.relative_to(ROOT.parent)}:{line}"


EDGES = list(_edges())


def test_the_scan_sees_the_package():
    tops = {_top(s) for s, _, _, _ in EDGES}
    assert {"numerics", "precision", "quant", "app", "cli"} <= tops and len(EDGES) > 200


def test_numerics_imports_nothing_else_of_leantrain():
    bad = [(w, t) for s, t, _, w in EDGES if _top(s) == "numerics" and _top(t) not in ("numerics", "")]
    assert not bad, bad


def test_no_library_module_imports_the_app_or_the_cli():
    bad = [(w, t) for s, t, _, w in EDGES if _top(s) not in {"app"} | ENTRY and _top(t) in {"app"} | ENTRY]
    assert not bad, bad


def test_capabilities_import_only_numerics_shared_ground_and_themselves():
    bad = [(w, t) for s, t, _, w in EDGES
           if _top(s) in CAPABILITIES and _top(t) not in {_top(s), "numerics", ""} | SHARED]
    assert not bad, bad


def test_shared_ground_imports_no_capability_and_no_app():
    bad = [(w, t) for s, t, _, w in EDGES if _top(s) in SHARED and _top(t) in CAPABILITIES | {"app"} | ENTRY]
    assert not bad, bad


def test_no_private_name_is_imported_from_another_module():
    bad = [(w, t, n) for s, t, names, w in EDGES for n in names
           if n.startswith("_") and not n.startswith("__") and not _is_module(f"{t}.{n}")]
    assert not bad, bad


def test_importing_the_library_and_plotting_keeps_the_matplotlib_backend(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
import importlib, pkgutil, sys
import leantrain
for info in pkgutil.walk_packages(leantrain.__path__, "leantrain."):
    importlib.import_module(info.name)
from leantrain.plots import curves
curves({str(tmp_path / "c.png")!r}, {{"a": ([0, 1], [1, 2])}}, xlabel="x", ylabel="y")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print("pyplot" if "matplotlib.pyplot" in sys.modules else "no pyplot")
"""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = str(ROOT.parent) + ":" + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if res.stdout.strip() != "no pyplot":
        pytest.fail("importing leantrain imported matplotlib.pyplot (a global figure manager)")


def test_a_data_loader_module_that_fails_to_import_is_an_error_not_a_missing_data_set():
    # sys.modules[name] = None makes `import name` raise ImportError, as a broken files.py would.
    code = """
import sys
sys.modules["leantrain.data.files"] = None
try:
    import leantrain.data
except ImportError as err:
    print("raised", err)
else:
    print("hidden", sorted(leantrain.data.DATASETS))
"""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT.parent) + ":" + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("raised") and "leantrain.data.files" in res.stdout, res.stdout
