"""Progress where a person watches, plain lines where a log file does (the trainer, a folder's first decoding,
serve_cli predict).

On a terminal: tqdm's live line on stderr (tqdm: small, pure Python, the PyTorch ecosystem's usual bar, and it
already handles what a hand-written `\\r` line did not: resizing, printing above the bar, rate smoothing; rich
would bring a whole rendering library for one line). Elsewhere (SLURM, Kubernetes, CI, `| tee`): no control
characters at all, one plain line every `every` seconds on `plain`, or nothing when `plain` is None.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, every: float = 30.0,
                 plain: TextIO | None = None, live: bool | None = None, delay: float = 0.0) -> None:
        self.total, self.desc, self.unit, self.every, self.plain = total, desc, unit, every, plain
        self.n, self.start_n = initial, initial
        self.fields = ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty() if live is None else live:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            leave=False, smoothing=0.1, delay=delay)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain is not None:
            now = time.monotonic()
            if now - self.last >= self.every:
                self.last = now
                print(self.line(now), file=self.plain, flush=True)

    def describe(self, desc: str) -> None:
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description_str(desc, refresh=False)

    def show(self, fields: str) -> None:
        """What follows the count (e.g. '9,812 img/s  loss 0.4113'), from the next refresh or plain line on."""
        self.fields = fields
        if self.bar is not None:
            self.bar.set_postfix_str(fields, refresh=False)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.start
        done = self.n - self.start_n
        count = f"{self.n:,}/{self.total:,} ({self.n / max(self.total, 1):.0%})" if self.total else f"{self.n:,}"
        eta = ""
        if self.total and done > 0:
            eta = f"  ETA {clock(elapsed / done * (self.total - self.n))}"
        fields = f"  {self.fields}" if self.fields else ""
        return f"{self.desc}  {self.unit} {count}  elapsed {clock(elapsed)}{eta}{fields}"

    def write(self, text: str, file: TextIO | None = None) -> None:
        """A line above a live bar (or simply printed)."""
        if self.bar is not None:
            self.bar.write(text, file=file or sys.stdout)
        else:
            print(text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
