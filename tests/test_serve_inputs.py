"""serve_cli's inputs: odd folder entries, names that are not UTF-8 and oversized images are error rows or
rows, never a stop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, pngs, run, synthetic_digits

pytestmark = pytest.mark.slow


def test_odd_folder_entries_become_error_rows(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    os.mkfifo(folder / "pipe.png")  # opening it would block forever
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a directory cycle under -r
    Image.fromarray(synthetic_digits(1, 5)[0][0]).save(folder / "sub" / "deep.png")
    proc = run("-m", "serve_cli", "predict", str(folder), "-r", "--model", str(exported_run), "--format", "jsonl",
               timeout=60)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in by_name["pipe.png"]["error"]
    assert "no such file" in by_name["dangling.png"]["error"]
    assert "cannot read" in by_name["loop.png"]["error"]
    assert sorted(by_name) == ["000.png", "001.png", "002.png", "dangling.png", "deep.png", "loop.png", "pipe.png"]
    assert len(rows) == 7  # the cycle was walked once


def test_non_utf8_file_names_are_printed(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 1)
    os.rename(folder / "000.png", os.fsencode(folder) + b"/caf\xe9.png")
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run)],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"caf\xe9.png" in proc.stdout


def test_huge_image_is_an_error_row_without_pillows_warning(exported_run: Path, tmp_path: Path) -> None:
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("1", (10000, 9000)).save(folder / "huge.png")  # 90 M pixels: just over Pillow's limit
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "image too large" in proc.stdout
    assert "DecompressionBomb" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
