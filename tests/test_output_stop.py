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
