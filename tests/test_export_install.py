"""export's install: a re-export replaces the previous one all at once, whatever thread a stop signal reaches."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from serve_cli.manifest import read_manifest, verify_file

# The stop reaches a thread that masks nothing (as torch's and ONNX Runtime's threads do) between the first
# and the second rename into the out dir.
SIGNAL_BETWEEN_RENAMES = '''
import os, signal, sys, threading, time
from pathlib import Path
import export.__main__ as export
out, signum = Path(sys.argv[2]), int(sys.argv[3])
go = threading.Event()
threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signum)), daemon=True).start()
rename = os.replace
def slow_rename(src, dst):
    rename(src, dst)
    if Path(dst).parent == out and not go.is_set():
        go.set()
        time.sleep(0.5)
os.replace = slow_rename
sys.exit(export.main(["--checkpoint", sys.argv[1], "--out-dir", str(out), "--batch-sizes", "1,2"]))
'''


def test_a_stop_between_the_renames_of_a_reexport_installs_all_of_it(exported_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    shutil.copytree(exported_run, out)
    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", SIGNAL_BETWEEN_RENAMES, str(exported_run.parent / "checkpoints"
                           / "best.pt"), str(out), str(int(signal.SIGTERM))], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: stopped by signal 15; it came as the export was installed, which was finished first: {out} "
        f"holds the new export, complete")
    after = {p.name: p.stat().st_ino for p in out.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before), "some files are the old export's"
    manifest = read_manifest(out)
    for kind in manifest["artifacts"]:
        verify_file(out, manifest, kind)  # each sha256 is the manifest's
