"""What serve_cli says of --output when a stop comes as the rows are put in place: the truth."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import ROOT, synthetic_digits

# The stop reaches another thread while --output's temp file is renamed over the target.
SIGNAL_AT_THE_RENAME = '''
import os, signal, sys, threading, time
from pathlib import Path
from serve_cli import output
from serve_cli.__main__ import main
go = threading.Event()
threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
rename = os.replace
def signalled_rename(src, dst):
    rename(src, dst)
    if Path(dst).name == "rows.csv":
        go.set()
        time.sleep(0.5)
output.os.replace = signalled_rename
sys.exit(main(["predict", sys.argv[1], "--model", sys.argv[2], "--format", "csv", "--output", sys.argv[3]]))
'''
import os
import time

import pytest

from conftest import one_error_line, pngs, predict
from serve_cli.__main__ import main as serve


def test_a_stop_as_the_output_is_renamed_says_every_row_was_written(exported_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(synthetic_digits(5, seed=8)[0]):
        Image.fromarray(np.asarray(img)).save(folder / f"{i}.png")
    rows = tmp_path / "rows.csv"
    rows.write_text("the previous rows\n")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_THE_RENAME, str(folder), str(exported_run), str(rows)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"serve_cli: interrupted by signal 15; every row was written to "
                                                    f"{rows}"), proc.stderr
    assert len(rows.read_text().splitlines()) == 6  # the header and a row per image


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_serve_cli_and_leaves_no_partial_file(exported_run: Path, tmp_path: Path,
                                                            signum: int) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    image = synthetic_digits(1, 0)[0][0]
    Image.fromarray(image).save(folder / "00000.png")
    for i in range(1, 4000):
        os.link(folder / "00000.png", folder / f"{i:05d}.png")
    out = tmp_path / "out" / "rows.csv"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run),
                             "--output", str(out), "--batch-size", "8", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.stat().st_size for p in out.parent.glob(".rows.csv.*.partial")):  # rows are being written
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum
    one_error_line(err, "interrupted")
    assert list(out.parent.iterdir()) == []


def test_interrupted_run_keeps_the_previous_regular_output(exported_run: Path, tmp_path: Path) -> None:
    """Regular files are still replaced atomically: a run that fails half-way leaves the old rows whole."""
    folder = pngs(tmp_path / "imgs", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rows.csv"
    out.write_text("old rows\n")
    inode = out.stat().st_ino
    assert serve(predict(exported_run, folder, out)) == 1  # one error row: the run completes, file replaced
    assert out.stat().st_ino != inode and len(out.read_text().splitlines()) == 5
    out.write_text("old rows\n")
    read_only = tmp_path / "ro.csv"
    read_only.write_text("keep\n")
    read_only.chmod(0o444)
    if os.access(read_only, os.W_OK):
        return  # root may write anything: the refusal below is for ordinary users
    assert serve(predict(exported_run, folder, read_only)) == 2
    assert read_only.read_text() == "keep\n"


def test_stop_message_says_where_rows_went(tmp_path: Path) -> None:
    from serve_cli.output import Written, what_became_of
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    assert what_became_of(str(fifo), Written()) == f"{fifo} holds the rows written so far (incomplete)"
    assert what_became_of(str(tmp_path / "rows.csv"), Written()) == "no --output file was written"
    assert what_became_of(None, Written()) == "the rows printed so far are incomplete"
    rows = str(tmp_path / "rows.csv")
    assert what_became_of(rows, Written(complete=True)) == f"every row was written to {rows}"  # a stop at the end
