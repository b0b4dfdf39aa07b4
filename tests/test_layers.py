"""The packages form a stack: serve_cli (torch-free, the shared contract) <- distributed <- export."""
from __future__ import annotations

import ast
import shutil
import subprocess

import pytest

from conftest import ROOT

BELOW = {"serve_cli": set(), "distributed": {"serve_cli"}, "export": {"serve_cli", "distributed"}}


def imports_of(package: str) -> dict[str, set[str]]:
    """Each module of `package` -> the other packages of ours it imports (at any depth of the file)."""
    found = {}
    for path in sorted((ROOT / package).glob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            tops |= {n.split(".")[0] for n in names} & set(BELOW) - {package}
        found[path.name] = tops
    return found


def test_imports_point_down_the_stack() -> None:
    for package, allowed in BELOW.items():
        for module, imported in imports_of(package).items():
            assert imported <= allowed, f"{package}/{module} imports {sorted(imported - allowed)}"


def test_serve_cli_imports_no_torch() -> None:
    for path in (ROOT / "serve_cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        # the TorchScript runtime imports torch lazily, inside the function that needs it
        top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in top_level if n.split(".")[0] == "torch"}, path.name
        assert path.name == "__init__.py" or names  # parsed something


def test_ruff_pyflakes_clean() -> None:
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(ROOT / ".venv" / "bin"))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    proc = subprocess.run([ruff, "check", "distributed", "export", "serve_cli", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
