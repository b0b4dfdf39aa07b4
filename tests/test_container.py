"""launch/container.sh's refusals (the images themselves are built and run by `launch/container.sh smoke`, in CI)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, one_error_line

SCRIPT = str(ROOT / "launch" / "container.sh")
TOOLS = ("docker", "podman", "buildah")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env or dict(os.environ))


def path_without_container_tools(tmp_path: Path) -> str:
    """A PATH holding every program of this one but docker, podman and buildah."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else ():
            target = bin_dir / program.name
            if program.name not in TOOLS and not target.exists() and os.access(program, os.X_OK):
                target.symlink_to(program)
    return str(bin_dir)


def test_no_container_tool_is_one_line_naming_all_three(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": path_without_container_tools(tmp_path)}
    env.pop("CONTAINER_TOOL", None)
    proc = run_script("build", env=env)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr, "docker", "podman", "buildah", "install")
    assert line.startswith("container.sh: error: no container tool")


@pytest.mark.parametrize("args,code,needle", [
    ((), 2, "launch/container.sh build"),
    (("deploy",), 2, "unknown command 'deploy'"),
    (("smoke", "--fast"), 2, "unknown argument '--fast' of smoke"),
    (("build", "--base"), 1, "--base needs an image"),
    (("build", "--torch-index", ""), 1, "--torch-index needs a URL"),
])
def test_usage_errors(args: tuple[str, ...], code: int, needle: str) -> None:
    proc = run_script(*args)
    assert proc.returncode == code and needle in proc.stderr, proc.stderr


def test_an_unknown_container_tool_is_refused() -> None:
    proc = run_script("build", env={**os.environ, "CONTAINER_TOOL": "nerdctl"})
    assert proc.returncode == 1
    one_error_line(proc.stderr, "CONTAINER_TOOL=nerdctl", "docker, podman or buildah")


def image_ids(tool: str) -> str:
    proc = subprocess.run([tool, "images", "--format", "{{.Name}}:{{.Tag}} {{.ID}}"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(not shutil.which("buildah"), reason="needs buildah (.ci/run installs it)")
def test_a_build_that_fails_leaves_no_image_tagged_and_no_container() -> None:
    env = {**os.environ, "CONTAINER_TOOL": "buildah"}
    before = image_ids("buildah")
    proc = run_script("build", "--base", "localhost/mnist-ddp-no-such-base:0", env=env)
    assert proc.returncode == 1
    assert "container.sh: error: building mnist-ddp:serve failed" in proc.stderr.splitlines()[-1]
    assert image_ids("buildah") == before
    containers = subprocess.run(["buildah", "containers", "--format", "{{.ContainerName}}"], capture_output=True,
                                text=True, timeout=60).stdout
    assert "mnist-ddp" not in containers and "no-such-base" not in containers


def test_the_serve_extra_is_what_the_project_itself_requires() -> None:
    """The serve image installs pyproject's `serve` extra alone: each entry must be the project's own requirement,
    bound and all, or serve_cli would run in the image on versions the project never claimed."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = project["optional-dependencies"]["serve"]
    assert serve and set(serve) <= set(project["dependencies"])
    assert not [r for r in serve if r.split(">")[0].split("=")[0] in ("torch", "torchvision", "onnx", "onnxscript")]
    dockerfile = (ROOT / "launch" / "Dockerfile").read_text()
    serve_stage = dockerfile[dockerfile.index(" AS serve"):dockerfile.index(" AS train")]
    assert '["optional-dependencies"]["serve"]' in serve_stage and "/tmp/src" not in serve_stage
