"""Numeric flags of the three commands are bounded where a large value would hang the command or exhaust
memory (threads, workers, batch sizes) or overflow (the seed): a usage error that names the flag and the most
that makes sense, exit 2, before any work."""
from __future__ import annotations

import os

import pytest

from distributed.train import main as train
from export.__main__ import main as export
from serve_cli.__main__ import main as serve

CORES = len(os.sched_getaffinity(0))  # what serve_cli bounds its workers and threads by
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


@pytest.mark.parametrize("command, flags, needle", [
    (serve, ["predict", "x.png", "--threads", "100000"], f"argument --threads: 100000 is not in [0, {CORES}]"),
    (serve, ["predict", "x.png", "--workers", "100000"], f"argument --workers: 100000 is not in [1, {4 * CORES}]"),
    (serve, ["predict", "x.png", "--workers", "0"], "argument --workers: 0 is not in [1,"),
    (serve, ["predict", "x.png", "--batch-size", "100000000"], "argument --batch-size: 100000000 is not in [1, 16384]"),
    (serve, ["predict", "x.png", "--top-k", "-1"], "argument --top-k: -1 is not in [0,"),
    (export, ["--run-dir", "r", "--batch-sizes", "1,100000000"], "--batch-sizes 1,100000000: give at most 8 sizes "
                                                                 "from 1 to 65536"),
    (export, ["--run-dir", "r", "--batch-sizes", ",".join(map(str, range(1, 10)))], "give at most 8 sizes"),
    (train, ["--seed", str(2 ** 70)], f"argument --seed: {2 ** 70} is not in [0, 4294967296)"),
    (train, ["--seed", "-1"], "argument --seed: -1 is not in [0, 4294967296)"),
])
def test_a_value_past_the_bound_is_a_usage_error(command, flags: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        command(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert needle in lines[-1] and "Traceback" not in err, err


def test_the_default_workers_are_within_the_bound(capsys) -> None:
    with pytest.raises(SystemExit):
        serve(["predict", "--help"])
    assert f"the {CORES} core(s)" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "-1"], ["--momentum", "-0.5"],
                                   ["--label-smoothing", "1"], ["--epochs", "0"], ["--val-size", "-3"],
                                   ["--weight-decay", "inf"], ["--batch-size", "two"]])
def test_nonsense_flags_are_usage_errors(flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", [["-m", "distributed.train", "--run-dir", ""],
                                 ["-m", "distributed.train", "--data-dir", " "],
                                 ["-m", "export", "--run-dir", ""],
                                 ["-m", "export", "--checkpoint", "x.pt", "--out-dir", ""]])
def test_an_empty_path_is_a_usage_error(cmd: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "an empty path" in proc.stderr
    assert list(tmp_path.iterdir()) == []
