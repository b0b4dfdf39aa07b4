"""serve_cli's rows parse back: every CSV row through the csv module (text cells through csv_text) and every
JSONL row through json give back the path and class names written, whatever they hold; no CSV cell starts
a spreadsheet formula."""
from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import synthetic_digits
from serve_cli.__main__ import main
from serve_cli.output import CsvWriter, JsonlWriter, Row, TableWriter, csv_cell, csv_text

# What file and class names may hold that a format could trip on: its delimiters and quotes, line ends,
# spreadsheet formula starts, the old top_k separators, and a byte that is not UTF-8 (a surrogate escape).
HOSTILE = ["\r", "\n", "\r\n", '"', ",", ";", ":", "=", "+", "-", "@", "'", "\t", " ", "a", "7", ".", "é", "字",
           "\udcff", "\\", "|", "%", "\x0b", "\u2028"]
FORMULA = re.compile(r"[=+\-@\t\r]")


def hostile_name(rng: random.Random) -> str:
    return "".join(rng.choice(HOSTILE) for _ in range(rng.randint(1, 7)))


def hostile_rows(n: int, top_k: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if rng.random() < 0.2:
            rows.append(Row(hostile_name(rng), error=rng.choice(["not an image Pillow can read", "blank image"])))
            continue
        top = tuple((hostile_name(rng), rng.random()) for _ in range(top_k))
        rows.append(Row(hostile_name(rng), top[0][0] if top else hostile_name(rng), rng.randrange(10),
                        rng.random(), top))
    return rows


def written(writer, rows: list[Row], top_k: int, tmp_path: Path) -> Path:
    """The rows as serve_cli writes them to a file (names that are not UTF-8 as their bytes)."""
    path = tmp_path / "rows"
    with open(path, "w", errors="surrogateescape") as stream:
        w = writer(stream, top_k)
        for row in rows:
            w.write(row)
    return path


def test_every_csv_row_parses_back_to_the_names_written(tmp_path: Path) -> None:
    rows = hostile_rows(3000, top_k=3)
    path = written(CsvWriter, rows, 3, tmp_path)
    with open(path, newline="", errors="surrogateescape") as f:
        header, *cells = list(csv.reader(f))
    assert len(cells) == len(rows)
    for row, line in zip(rows, cells):
        got = dict(zip(header, line, strict=True))
        assert csv_text(got["path"]) == row.path
        assert csv_text(got["class"]) == (row.label or "") and csv_text(got["error"]) == (row.error or "")
        for i, (name, p) in enumerate(row.top_k, 1):
            assert csv_text(got[f"top{i}_class"]) == name and float(got[f"top{i}_confidence"]) == round(p, 6)
        for column in ("path", "class", "top1_class", "top2_class", "top3_class", "error"):
            assert not FORMULA.match(got[column]), (column, got[column])  # a spreadsheet shows it as text


def test_every_jsonl_row_parses_back_to_the_names_written(tmp_path: Path) -> None:
    rows = hostile_rows(3000, top_k=2, seed=1)
    path = written(JsonlWriter, rows, 2, tmp_path)
    lines = path.read_text(errors="surrogateescape").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(rows)
    for row, line in zip(rows, lines):
        record = json.loads(line)
        assert record["path"] == row.path
        if row.error is None:
            assert record["class"] == row.label and [t["class"] for t in record["top_k"]] == [c for c, _ in row.top_k]
        else:
            assert record["error"] == row.error


def test_a_table_row_stays_one_line() -> None:
    stream = io.StringIO()
    writer = TableWriter(stream, 1)
    for row in hostile_rows(500, top_k=1, seed=2):
        writer.write(row)
    assert len(stream.getvalue().split("\n")) == 502  # header, 500 rows, the final newline


def test_csv_cells_that_look_like_formulas_or_quotes_round_trip() -> None:
    for name in ["=HYPERLINK(\"http://x\",\"y\")", "+1", "-1", "@SUM(A1)", "'=x", "''+x", "'x", "''", "\t=x", "x=y"]:
        stream = io.StringIO()
        CsvWriter(stream, 0).write(Row(name, name, 0, 0.5))
        cell = next(csv.reader(io.StringIO(stream.getvalue().split("\n", 1)[1])))[0]
        assert csv_text(cell) == name and not FORMULA.match(cell), (name, cell)


def test_predict_writes_csv_that_parses_back_for_hostile_file_names(exported_run: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The whole command, on real files named as inputs: a carriage return used to split a row in two, and a
    name starting with = landed in a cell that spreadsheets run."""
    names = ["cr\rx.png", "nl\ny.png", '=HYPERLINK("evil.example","click").png', "+1.png", "@a.png", "-2.png",
             "a;b:0.9.png", 'q"uote,comma.png', "'=quoted.png"]
    images, _ = synthetic_digits(len(names), seed=7)
    for name, img in zip(names, images):
        Image.fromarray(np.asarray(img), mode="L").save(tmp_path / name, format="PNG")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", str(exported_run), "--format", "csv", "--top-k", "2", "--output", "rows.csv",
                 "--workers", "1", "--", *names]) == 0
    with open("rows.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert len(rows) == len(names) and all(len(row) == len(header) for row in rows)
    unescape = (lambda cell: cell[1:] if re.match(r"'+[=+\-@\t\r]", cell) else cell)  # the README's rule
    assert [unescape(row[0]) for row in rows] == names
    assert not [row[0] for row in rows if FORMULA.match(row[0])]


def test_the_bare_csv_row_is_the_csv_modules_row(tmp_path: Path) -> None:
    """CsvWriter writes a plain row (no error, no top-k, names needing no quotes) itself: byte for byte what the
    csv module and csv_cell write, for hostile names too (which must take the csv module's path)."""
    rows = [row for row in hostile_rows(5000, top_k=0, seed=3) if row.error is None]
    rows += [Row("images/0001.png", "7", 7, 0.987654321), Row("a b/é字.png", "T-shirt/top", 0, 1.0)]
    fast = written(CsvWriter, rows, 0, tmp_path).read_bytes()
    expected = io.StringIO()
    module = csv.writer(expected, lineterminator="\n")
    quoted = csv.writer(expected, lineterminator="\n", quoting=csv.QUOTE_ALL)
    module.writerow(("path", "class", "index", "confidence", "error"))
    for row in rows:
        cells = (csv_cell(row.path), csv_cell(row.label), row.index, f"{row.confidence:.6f}", "")
        (quoted if "\r" in row.path + row.label else module).writerow(cells)
    assert fast == expected.getvalue().encode("utf-8", "surrogateescape")
