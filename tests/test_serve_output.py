"""serve_cli --output: checked before any work, never an input, a regular file replaced atomically, anything
else (a device, FIFO, link through /dev) written through."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, device_node, one_error_line, pngs, predict, snapshot
from serve_cli.__main__ import main as serve

pytestmark = pytest.mark.slow


def test_output_that_is_an_input_is_refused(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs")
    before = snapshot(folder)
    for output, inputs in ((folder / "000.png", [str(folder / "000.png")]), (folder / "001.png", [str(folder)])):
        assert serve(["predict", *inputs, "--model", str(exported_run), "--output", str(output)]) == 2
        one_error_line(capsys.readouterr().err, "is one of the input images")
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", ["folder", "missing_parent", "unwritable_place"])
def test_unwritable_output_fails_before_any_work(exported_run: Path, tmp_path: Path, capsys, case: str) -> None:
    folder = pngs(tmp_path / "imgs")
    output = {"folder": tmp_path, "missing_parent": tmp_path / "nope" / "out.csv",
              "unwritable_place": Path("/proc/out.csv")}[case]  # /proc takes no new files, even from root
    start = time.perf_counter()
    assert serve(["predict", str(folder), "--model", str(exported_run), "--output", str(output)]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "--output")
    assert captured.out == "" and time.perf_counter() - start < 5


def test_output_link_stays_a_link_and_its_target_gets_the_rows(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "rows.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "rows.csv"
    link.symlink_to(target)
    assert serve(predict(exported_run, folder, link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    lines = target.read_text().splitlines()
    assert lines[0].startswith("path,") and len(lines) == 4
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the user's file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "real", "rows.csv"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.csv"]


def test_output_fifo_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)  # never blocks exit
    reader.start()
    assert serve(predict(exported_run, folder, fifo)) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(received) == 1 and len(received[0].splitlines()) == 4


def test_output_device_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    null = device_node(tmp_path / "null", 3)
    assert serve(predict(exported_run, folder, null)) == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "null"]


def test_full_device_is_an_error(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    full = device_node(tmp_path / "full", 7)
    assert serve(predict(exported_run, folder, full)) == 1
    one_error_line(capsys.readouterr().err, "--output", "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_to_dev_fd_reaches_the_shells_redirect(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    redirect = tmp_path / "stdout.txt"
    with open(redirect, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, folder, "/dev/fd/1")],
                              cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(redirect.read_text().splitlines()) == 4


def test_output_link_to_dev_stdout_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    link = tmp_path / "so"
    link.symlink_to("/dev/stdout")
    redirect = tmp_path / "redirect.txt"
    with open(redirect, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, folder, link)], cwd=ROOT,
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
        inode = os.fstat(out.fileno()).st_ino
    assert proc.returncode == 0, proc.stderr
    assert redirect.stat().st_ino == inode and link.is_symlink()  # the shell's file, not a replacement
    assert redirect.read_text().startswith("path,") and len(redirect.read_text().splitlines()) == 4


def test_output_keeps_its_owner_and_refuses_a_trailing_slash(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs", 2)
    owned = tmp_path / "owned.csv"
    owned.write_text("old\n")
    try:
        os.chown(owned, 65534, 65534)
    except PermissionError:
        pytest.skip("changing a file's owner needs root")
    assert serve(predict(exported_run, folder, owned)) == 0
    assert (owned.stat().st_uid, owned.stat().st_gid) == (65534, 65534) and owned.read_text().startswith("path,")
    capsys.readouterr()
    assert serve(predict(exported_run, folder, f"{owned}/")) == 2
    one_error_line(capsys.readouterr().err, "ends with / but is not a folder")
    assert owned.read_text().startswith("path,")


def test_a_run_with_nothing_to_predict_leaves_a_device_or_fifo_output_untouched(exported_run: Path,
                                                                                tmp_path: Path) -> None:
    """The output is opened only once there are images: `--output /dev/stdout >> rows.csv` on an empty folder
    keeps the rows already there (reopening /dev/stdout for writing would empty the file), and a FIFO that no
    one reads does not hold the error back."""
    empty = tmp_path / "empty"
    empty.mkdir()
    kept = tmp_path / "rows.csv"
    kept.write_text("old rows\n")
    with open(kept, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, empty, "/dev/stdout")],
                              cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2 and "no image files" in proc.stderr, proc.stderr
    assert kept.read_text() == "old rows\n"
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, empty, str(fifo))],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "no image files" in proc.stderr, proc.stderr
