"""The packages form a stack: serve_cli.base (torch-free, the shared contract) <- serve_cli's CLI, distributed <-
export. Nothing in the base imports torch or the CLI; the trainer and the exporter import the base, never the CLI."""
from __future__ import annotations

import ast
import shutil
import subprocess

import pytest

from conftest import ROOT

# each layer -> the layers of ours it may import (a layer is a package, or serve_cli's base sub-package)
BELOW = {"serve_cli.base": set(), "serve_cli": {"serve_cli.base"}, "distributed": {"serve_cli.base"},
         "export": {"serve_cli.base", "distributed"}}


def layer_of(module: str) -> str | None:
    """The layer an absolute module name belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] == "serve_cli":
        return "serve_cli.base" if parts[1:2] == ["base"] else "serve_cli"
    return parts[0] if parts[0] in BELOW else None


def files_of(layer: str) -> list:
    folder = ROOT.joinpath(*layer.split("."))
    return sorted(folder.glob("*.py"))


def imports_of(layer: str) -> dict[str, set[str]]:
    """Each module of `layer` -> the other layers of ours it imports (at any depth of the file; a relative import
    resolved against the module's package)."""
    found = {}
    for path in files_of(layer):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names.append(".".join(n for n in (base, node.module or "") if n))
            elif isinstance(node, ast.Import):
                names += [a.name for a in node.names]
        found[path.name] = {layer_of(n) for n in names} - {None, layer}
    return found


def test_imports_point_down_the_stack() -> None:
    for layer, allowed in BELOW.items():
        assert files_of(layer), layer
        for module, imported in imports_of(layer).items():
            assert imported <= allowed, f"{layer}/{module} imports {sorted(imported - allowed)}"


def test_serve_cli_imports_no_torch() -> None:
    for path in files_of("serve_cli") + files_of("serve_cli.base"):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        # the TorchScript runtime imports torch lazily, inside the function that needs it
        top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names} | \
            {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in top_level if n.split(".")[0] == "torch"}, path.name
        if path.parent.name == "base":  # the base: no torch at any depth
            assert not {n for n in names if n.split(".")[0] == "torch"}, path.name
        assert path.name == "__init__.py" or names  # parsed something


def test_ruff_pyflakes_clean() -> None:
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(ROOT / ".venv" / "bin"))
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    proc = subprocess.run([ruff, "check", "distributed", "export", "serve_cli", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
