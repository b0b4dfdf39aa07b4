"""Result rows and their writers (table, csv, jsonl); rows are written and flushed as each batch finishes."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from typing import TextIO


@dataclass(frozen=True)
class Row:
    path: str
    label: str | None = None  # predicted class name
    index: int | None = None
    confidence: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None


class TableWriter:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        stream.write(f"{'class':>6} {'index':>5} {'conf':>7}  path\n")

    def write(self, row: Row) -> None:
        if row.error is not None:
            self.stream.write(f"{'-':>6} {'-':>5} {'error':>7}  {row.path}: {row.error}\n")
            return
        alternatives = "  (" + ", ".join(f"{c} {p:.1%}" for c, p in row.top_k) + ")" if row.top_k else ""
        self.stream.write(f"{row.label:>6} {row.index:>5} {row.confidence:>7.2%}  {row.path}{alternatives}\n")


class CsvWriter:
    FIELDS = ("path", "class", "index", "confidence", "top_k", "error")

    def __init__(self, stream: TextIO) -> None:
        self.csv = csv.writer(stream, lineterminator="\n")
        self.csv.writerow(self.FIELDS)

    def write(self, row: Row) -> None:
        top = ";".join(f"{c}:{p:.6f}" for c, p in row.top_k)
        conf = f"{row.confidence:.6f}" if row.confidence is not None else ""
        self.csv.writerow((row.path, row.label or "", "" if row.index is None else row.index, conf, top,
                           row.error or ""))


class JsonlWriter:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, row: Row) -> None:
        if row.error is not None:
            record = {"path": row.path, "error": row.error}
        else:
            record = {"path": row.path, "class": row.label, "index": row.index,
                      "confidence": round(row.confidence, 6)}
            if row.top_k:
                record["top_k"] = [{"class": c, "confidence": round(p, 6)} for c, p in row.top_k]
        self.stream.write(json.dumps(record) + "\n")


WRITERS = {"table": TableWriter, "csv": CsvWriter, "jsonl": JsonlWriter}
