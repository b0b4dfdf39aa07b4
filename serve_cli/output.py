"""Where the rows go and how: --output (a regular file replaced atomically at the end; a device, FIFO or link
through /dev written through, never replaced) and the row writers (table, csv, jsonl), flushed per batch."""
from __future__ import annotations

import csv
import json
import os
import re
import stat
import sys
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, TextIO

from .base.cli import UsageError, stop_signals_deferred
from .base.images import IMAGE_SUFFIXES


class Row(NamedTuple):  # a tuple, not a frozen dataclass: made 10,000 times a second, at a third of the cost
    path: str
    label: str | None = None  # predicted class name
    index: int | None = None
    confidence: float | None = None
    top_k: tuple[tuple[str, float], ...] = ()
    error: str | None = None


def shown(text: str) -> str:
    """A name for the table, which people read: control characters (a newline in a file name would fake a row),
    line separators and bidirectional marks (which reorder what is shown) as escapes."""
    if text.isascii() and text.isprintable():  # the usual name, at once: ASCII's only such characters are Cc
        return text
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
                   else c for c in text)


class TableWriter:
    def __init__(self, stream: TextIO, top_k: int) -> None:
        self.stream = stream
        stream.write(f"{'class':>6} {'index':>5} {'conf':>7}  path\n")

    def write(self, row: Row) -> None:
        if row.error is not None:
            self.stream.write(f"{'-':>6} {'-':>5} {'error':>7}  {shown(row.path)}: {shown(row.error)}\n")
            return
        alternatives = "  (" + ", ".join(f"{shown(c)} {p:.1%}" for c, p in row.top_k) + ")" if row.top_k else ""
        self.stream.write(f"{shown(row.label or ''):>6} {row.index:>5} {row.confidence:>7.2%}  {shown(row.path)}"
                          f"{alternatives}\n")


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP's CSV injection list).
FORMULA_START = re.compile(r"'*[=+\-@\t\r]")


def csv_cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: one ' before a formula's first character (and before the 's
    already in front of one, so that csv_text always gives the name back)."""
    return "'" + text if FORMULA_START.match(text) else text


def csv_text(cell: str) -> str:
    """The name a text cell of our CSV stands for: csv_cell undone (for readers that use the csv module)."""
    return cell[1:] if cell.startswith("'") and FORMULA_START.match(cell[1:]) else cell


# A text cell that the csv module writes bare and csv_cell leaves as it is: no delimiter, quote or line end, and
# no formula's start (FORMULA_START's own pattern).
BARE_CELL = re.compile(f"(?!{FORMULA_START.pattern})" + r"[^,\"\r\n]*\Z")


class CsvWriter:
    """path, class, index, confidence, then top1_class, top1_confidence ... topK_* with --top-k K, then error.

    Quoted as the csv module does (RFC 4180); a row with a carriage return in a cell is quoted in full, which
    the csv module's own minimal quoting would leave bare with "\\n" line ends. Text cells go through csv_cell."""

    def __init__(self, stream: TextIO, top_k: int) -> None:
        self.stream = stream
        self.csv = csv.writer(stream, lineterminator="\n")
        self.quoted = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)
        self.top_k = top_k
        self.csv.writerow(("path", "class", "index", "confidence",
                           *(f"top{i}_{field}" for i in range(1, top_k + 1) for field in ("class", "confidence")),
                           "error"))

    def write(self, row: Row) -> None:
        if not self.top_k and row.error is None and BARE_CELL.match(row.path) and BARE_CELL.match(row.label or ","):
            # the usual row, as the csv module would write it, at a third of its cost
            self.stream.write(f"{row.path},{row.label},{row.index},{row.confidence:.6f},\n")
            return
        top = [cell for c, p in row.top_k for cell in (csv_cell(c), f"{p:.6f}")]
        top += [""] * (2 * self.top_k - len(top))
        conf = f"{row.confidence:.6f}" if row.confidence is not None else ""
        cells = (csv_cell(row.path), csv_cell(row.label or ""), "" if row.index is None else row.index, conf, *top,
                 csv_cell(row.error or ""))
        texts = (row.path, row.label or "", row.error or "", *(c for c, _ in row.top_k))  # the only cells of text
        writer = self.quoted if any("\r" in text for text in texts) else self.csv
        writer.writerow(cells)


class JsonlWriter:
    def __init__(self, stream: TextIO, top_k: int) -> None:
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


class OutputError(OSError):
    """Writing the rows failed (a full disk or device); the message says what became of --output."""


@dataclass
class Written:
    """Whether every row has reached its place (the output replaced, or written through and closed): what a
    stop after that says."""
    complete: bool = False


@contextmanager
def open_output(path: str | None, written: Written) -> Iterator[TextIO]:
    """stdout; or, for a regular file (or a link to one, which stays a link), a temp file beside the real file
    that replaces it only when the run completes; or, for anything else (a device, a FIFO, /dev/fd/N), the
    path itself, written through: replacing it would swap a system's device node for a file.

    predict opens it once the model is checked and the inputs are found to hold images, before any image is
    read: a run with nothing to predict leaves a device or FIFO untouched, and an unwritable place fails
    before the long work (check_output has already refused the places known to be wrong).
    """
    if path is None:
        if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 print as their bytes
            sys.stdout.reconfigure(errors="surrogateescape")
        yield sys.stdout
        sys.stdout.flush()
        written.complete = True
        return
    if writes_through(Path(path)):
        try:
            stream = open(path, "w", errors="surrogateescape")
        except OSError as e:
            raise UsageError(f"--output {path}: cannot open ({e.strerror})") from None
        try:
            with stream:  # closing flushes: a full device fails here
                yield stream
            written.complete = True
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(e.errno, f"--output {path}: {e.strerror}; the rows may be incomplete") from None
        return
    target = real_file(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as e:
        raise UsageError(f"--output {path}: cannot write in {target.parent} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", errors="surrogateescape") as stream:
            yield stream
        with stop_signals_deferred():  # a stop now would say nothing was written
            keep_owner_and_mode(tmp, target)
            os.replace(tmp, target)
            written.complete = True
    except BaseException as e:  # a stop, a full disk, a closed pipe: the target is as it was
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
            raise OutputError(e.errno, f"{e.filename or path}: {e.strerror}; no --output file was written") from None
        raise


def keep_owner_and_mode(tmp: str, target: Path) -> None:
    """The replacement keeps the replaced file's permissions and, where we may, its owner (as root, a user's file
    would otherwise become root's)."""
    if not target.exists():
        os.chmod(tmp, 0o644)
        return
    info = target.stat()
    os.chmod(tmp, stat.S_IMODE(info.st_mode))
    try:
        os.chown(tmp, info.st_uid, info.st_gid)
    except PermissionError:
        pass


def writes_through(target: Path) -> bool:
    """Whether --output is something other than a regular file: it is then written in place, never replaced.

    Anything under /dev or /proc counts, whatever it points at, and so does a link that leads through them:
    /dev/fd/1 may lead to the shell's redirect file, which only the shell's open descriptor reaches."""
    if any(str(step).startswith(("/dev/", "/proc/")) for step in link_chain(target)):
        return True
    try:
        return not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:  # a new file, or a link to one not made yet
        return False
    except OSError as e:  # a link loop
        raise UsageError(f"--output {target}: cannot use it ({e.strerror})") from None


def link_chain(path: Path, limit: int = 40) -> list[Path]:
    """The path, then each place its links lead to, one step at a time (absolute, not resolved further)."""
    steps = [Path(os.path.abspath(path))]
    while steps[-1].is_symlink() and len(steps) <= limit:
        try:
            target = os.readlink(steps[-1])
        except OSError:
            break
        steps.append(Path(os.path.abspath(steps[-1].parent / target)))
    return steps


def real_file(path: str) -> Path:
    """The regular file --output names: a link is followed, so that the link stays and its target gets the rows."""
    target = Path(path)
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"--output {path} is read-only: make it writable or choose another file")
    if not target.parent.is_dir():
        raise UsageError(f"--output {path}: folder {target.parent} does not exist")
    return target


def check_output(output: str | None, inputs: list[str], recursive: bool) -> None:
    """--output must be a new or regular file that is not one of the inputs (it would be overwritten)."""
    if output is None:
        return
    target = Path(output)
    if output.endswith("/") and not target.is_dir():  # Path() drops the slash; the shell says "Not a directory"
        raise UsageError(f"--output {output} ends with / but is not a folder: give a file name")
    if target.is_dir():
        raise UsageError(f"--output {output} is a folder: give a file name")
    if not target.parent.is_dir():
        raise UsageError(f"--output {output}: folder {target.parent} does not exist")
    if not target.exists():
        return
    real = target.resolve()
    for item in map(Path, inputs):
        folder = item.resolve()
        listed = real.suffix.lower() in IMAGE_SUFFIXES and (
            real.parent == folder or (recursive and folder in real.parents))
        if (item.is_file() and folder == real) or (item.is_dir() and listed):
            raise UsageError(f"--output {output} is one of the input images: choose another file name")


def what_became_of(output: str | None, written: Written) -> str:
    """After a stop: where the rows went. A replaced file is untouched until the end; the others got part of them."""
    if written.complete:
        return f"every row was written{f' to {output}' if output else ''}"
    if output is None:
        return "the rows printed so far are incomplete"
    try:
        through = writes_through(Path(output))
    except UsageError:
        through = False
    return f"{output} holds the rows written so far (incomplete)" if through else "no --output file was written"
