"""What the three command lines share: argparse value types and one-line error text. Imports nothing of ours."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


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
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value
    return parse


POSITIVE_INT = number_in(int, 1)
NON_NEGATIVE_INT = number_in(int, 0)
POSITIVE = number_in(float, 0, low_open=True)
NON_NEGATIVE = number_in(float, 0)
FRACTION = number_in(float, 0, 1, high_open=True)  # [0, 1)


def path_text(text: str) -> str:
    """An argparse type: a path that is not empty (an empty one would mean the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name a folder (. for the working directory)")
    return text


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception in one short line, for a one-line error message (its type when it says nothing)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
