"""What the three command lines share: argparse value types, one-line error text, and how a stop signal
(Ctrl-C, SIGTERM, a closed terminal's SIGHUP) reaches the program. Imports nothing of ours."""
from __future__ import annotations

import argparse
import math
import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator

# Ctrl-C; what SLURM, Kubernetes and `kill` send; and what a closed terminal or ssh session sends.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class UsageError(RuntimeError):
    """The command cannot do its job at all: exit 2 with one line."""


def number_in(kind: type, low: float, high: float = math.inf, high_open: bool = False,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite `kind` within the bounds, else a usage error that names them."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' if kind is int else ''} number") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high)):
            shown = (lambda v: str(int(v)) if kind is int and math.isfinite(v) else f"{v:g}")
            bounds = f"{'(' if low_open else '['}{shown(low)}, {shown(high)}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value
    return parse


POSITIVE_INT = number_in(int, 1)
NON_NEGATIVE_INT = number_in(int, 0)
POSITIVE = number_in(float, 0, low_open=True)
NON_NEGATIVE = number_in(float, 0)
FRACTION = number_in(float, 0, 1, high_open=True)  # [0, 1)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a SLURM job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each flag's help, but where the help already gives the default or the
    default is None (the help then says what its absence means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def path_text(text: str) -> str:
    """An argparse type: a path that is not empty (an empty one would mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a folder (. for the working directory)")
    return text


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception in one short line, for a one-line error message (its type when it says nothing)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class Stopped(BaseException):
    """A stop signal, raised where the program is. A BaseException, as KeyboardInterrupt is: no
    `except Exception` on its way (a decoder's, a loader's) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def terminals() -> tuple[int, ...]:
    """stdout and stderr where they are a terminal: what a hangup takes away."""
    return tuple(fd for fd in (1, 2) if os.isatty(fd))


def after_hangup(signum: int, ttys: tuple[int, ...]) -> None:
    """After SIGHUP the terminal is gone, and every write to it fails (EIO): those of `ttys` write to /dev/null
    from then on, so that the stop can still save and end as it should (a log file or pipe keeps its lines)."""
    if signum != signal.SIGHUP or not ttys:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in ttys:
        os.dup2(null, fd)
    os.close(null)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within: each stop signal raises Stopped (exit 128 + signum is the caller's); the previous handlers after."""
    ttys = terminals()

    def _raise_stopped(signum: int, frame: object) -> None:
        after_hangup(signum, ttys)
        raise Stopped(signum)
    previous = {signum: signal.signal(signum, _raise_stopped) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Within: a stop signal is only recorded, for steps that must not be cut short (a few renames); when they
    are done, the first one recorded raises Stopped (an exception from within goes on as it is). The Python
    handler is swapped, not the signal mask: a mask holds in one thread only, and the kernel hands a
    process-directed signal to any thread that does not mask it (torch's, ONNX Runtime's); CPython runs the
    handler in the main thread whichever took it."""
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Stopped(received[0])
