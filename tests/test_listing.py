"""serve_cli.base.images.find_images: what `predict --recursive` reads, for trees as deep as the file system allows."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_digits
from serve_cli.__main__ import main
from serve_cli.base.images import find_images

DIGIT = synthetic_digits(1, seed=2)[0][0]


def nest(top: Path, levels: int) -> Path:
    """top/d/d/.../d, one level at a time (Path.mkdir(parents=True) recurses too)."""
    top.mkdir()
    folder = top
    for _ in range(levels):
        folder = folder / "d"
        folder.mkdir()
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """A folder for a deep tree, removed by rm (pytest's own clean-up recurses, and fails on such a tree)."""
    top = tmp_path / "tree"
    try:
        yield top
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_a_tree_deeper_than_the_recursion_limit_is_walked(exported_run: Path, tree: Path, tmp_path: Path) -> None:
    deepest = nest(tree, 1200)  # 2,400 characters: a legal path (PATH_MAX is 4,096)
    middle = tree.joinpath(*["d"] * 600)
    for folder in (tree, middle, deepest):
        Image.fromarray(DIGIT).save(folder / "x.png")
    found = list(find_images([str(tree)], recursive=True))
    assert found == [str(deepest / "x.png"), str(middle / "x.png"), str(tree / "x.png")]
    out = tmp_path / "rows.csv"
    assert main(["predict", str(tree), "--recursive", "--model", str(exported_run), "--format", "csv",
                 "--output", str(out)]) == 0
    assert len(list(csv.DictReader(out.open()))) == 3


def test_a_folder_too_deep_to_open_gets_an_error_row_and_the_rest_are_read(exported_run: Path, tree: Path,
                                                                           capsys) -> None:
    tree.mkdir()
    Image.fromarray(DIGIT).save(tree / "a.png")
    here = os.getcwd()
    try:  # "d/" x 2100 after the tmp path: past PATH_MAX, so made one step at a time
        os.chdir(tree)
        for i in range(2100):
            os.mkdir("d")
            os.chdir("d")
            if i == 5:
                Image.fromarray(DIGIT).save("shallow.png")
        Image.fromarray(DIGIT).save("bottom.png")
    finally:
        os.chdir(here)
    assert main(["predict", str(tree), "--recursive", "--model", str(exported_run), "--format", "jsonl"]) == 1
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line]
    assert len(rows) == 3, out[:2000]
    errors = [row for row in rows if "error" in row]
    assert len(errors) == 1 and errors[0]["error"] == "cannot read (File name too long)", str(errors)[:500]
    assert errors[0]["path"].startswith(str(tree / "d" / "d")) and len(errors[0]["path"]) > 4000
    assert sorted(Path(row["path"]).name for row in rows if "class" in row) == ["a.png", "shallow.png"]


def test_a_listing_is_the_same_sorted_depth_first_order_as_before(tmp_path: Path) -> None:
    for rel in ["b/2.png", "b/a/1.png", "a.png", "c.png", "b/z.png", "b.png", "b/a/c/0.png", "b/note.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [os.path.relpath(p, tmp_path) for p in find_images([str(tmp_path)], recursive=True)]
    assert found == ["a.png", "b/2.png", "b/a/1.png", "b/a/c/0.png", "b/z.png", "b.png", "c.png"]
    flat = [os.path.relpath(p, tmp_path) for p in find_images([str(tmp_path)], recursive=False)]
    assert flat == ["a.png", "b.png", "c.png"]
    assert np.asarray(DIGIT).shape == (28, 28)


def test_image_names_are_those_whose_splitext_suffix_is_an_image_suffix() -> None:
    """image_name stands in for os.path.splitext per listed file: the same answer for names made of dots,
    suffix letters in either case and other characters (".png" and "..png" have no suffix; "a..png" has one)."""
    import random

    from serve_cli.base.images import IMAGE_SUFFIXES, image_name
    rng = random.Random(0)
    names = ["".join(rng.choice("a.PNGpngjJ x") for _ in range(rng.randint(1, 8))) for _ in range(50_000)]
    names += [".png", "..png", "a..png", ".a.png", "x.PNG", "x.png.txt", "png", "x.", "...", "x.jpeg", "x.tiff"]
    wrong = [n for n in names if image_name(n) != (os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES)]
    assert not wrong, wrong[:5]
    assert image_name("x.PNG") and not image_name(".png") and image_name("a..png")


def test_paths_are_spelled_as_path_spells_them(tmp_path: Path, monkeypatch) -> None:
    """Rows name files as Path would: "." lists "a.png", not "./a.png"; "./sub/" lists "sub/x.png"."""
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    for rel in ["a.png", "sub/x.png", "sub/deep/y.png"]:
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert list(find_images(["."], recursive=True)) == ["a.png", "sub/deep/y.png", "sub/x.png"]
    assert list(find_images(["./sub/", ".//a.png"], recursive=False)) == ["sub/x.png", "a.png"]
    assert list(find_images([str(tmp_path / "sub") + "/"], recursive=False)) == [str(tmp_path / "sub" / "x.png")]
