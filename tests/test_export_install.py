"""export's install: a re-export replaces the previous one all at once, whatever thread a stop signal reaches,
and what a stop or a failed rename says is what became of the out dir."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from serve_cli.base.manifest import read_manifest, verify_file

# A re-export with one fault injected at the first rename into the out dir (argv[3]):
#   thread: a stop signal reaches a thread that masks nothing (as torch's and ONNX Runtime's threads do) and
#           CPython runs the handler in the main thread before the second rename;
#   after:  a stop signal while the staging dir is removed, once everything is installed;
#   eio:    the second rename fails (an I/O error).
FAULT = '''
import errno, os, shutil, signal, sys, threading, time
from pathlib import Path
import export.__main__ as export
out, fault = Path(sys.argv[2]), sys.argv[3]
go = threading.Event()
threading.Thread(target=lambda: (go.wait(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
rename, renames = os.replace, []
def faulty_rename(src, dst):
    if Path(dst).parent == out:
        renames.append(dst)
        if fault == "eio" and len(renames) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
    rename(src, dst)
    if fault == "thread" and len(renames) == 1:
        go.set()
        time.sleep(0.5)
os.replace = faulty_rename
rmtree = shutil.rmtree
def signalled_rmtree(path, *args, **kwargs):
    if fault == "after" and renames:
        os.kill(os.getpid(), signal.SIGTERM)
    rmtree(path, *args, **kwargs)
export.shutil.rmtree = signalled_rmtree
sys.exit(export.main(["--checkpoint", sys.argv[1], "--out-dir", str(out), "--batch-sizes", "1,2"]))
'''
import time

from conftest import one_error_line


def reexport_with(fault: str, exported_run: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path,
                                                                               dict[str, int]]:
    out = tmp_path / "export"
    shutil.copytree(exported_run, out)
    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    proc = subprocess.run([sys.executable, "-c", FAULT, str(exported_run.parent / "checkpoints" / "best.pt"),
                           str(out), fault], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, out, before


def assert_all_new(out: Path, before: dict[str, int]) -> None:
    after = {p.name: p.stat().st_ino for p in out.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before), "some files are the old export's"
    manifest = read_manifest(out)
    for kind in manifest["artifacts"]:
        verify_file(out, manifest, kind)  # each sha256 is the manifest's


def test_a_stop_between_the_renames_of_a_reexport_installs_all_of_it(exported_run: Path, tmp_path: Path) -> None:
    proc, out, before = reexport_with("thread", exported_run, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: stopped by signal 15; it came once the export was installed: {out} holds the new export, complete")
    assert_all_new(out, before)


def test_a_stop_after_the_install_says_the_export_is_complete(exported_run: Path, tmp_path: Path) -> None:
    proc, out, before = reexport_with("after", exported_run, tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{out} holds the new export, complete"), proc.stderr
    assert_all_new(out, before)


def test_a_rename_that_fails_midway_names_what_is_new(exported_run: Path, tmp_path: Path) -> None:
    proc, out, before = reexport_with("eio", exported_run, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "nothing was exported" not in line, line
    assert f"{out}/" in line and "had been replaced" in line, line
    assert "export again" in line


def test_a_signal_during_the_parity_gate_leaves_nothing(ddp_run: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-m", "export", "--run-dir", str(ddp_run), "--out-dir", str(out_dir),
                             "--batch-sizes", "1,2,3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".export.staging-*/model.onnx")):  # the artifacts are written: the gate is next
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    one_error_line(err, "stopped by signal 15", "nothing was exported")
    assert list(tmp_path.iterdir()) == []
