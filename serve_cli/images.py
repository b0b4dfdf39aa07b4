"""Decode any image Pillow reads and turn it into an MNIST-style digit: float32 [28, 28] in [0, 1].

MNIST digits are bright ink on black, the ink's bounding box scaled to 20 px on its longest side and
placed so that its centre of mass sits at the centre of the 28x28 field. An image that already is
such a digit (28x28 with a dark background, 8- or 16-bit, gray or colour) passes through untouched,
so MNIST test images saved as PNG give exactly the in-memory predictions.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE, BOX = 28, 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
                  ".pnm"}
EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}  # formats whose orientation tag is read at open
MIN_CONTRAST = 0.08  # below this the picture holds no ink worth reading
INK_LEVEL = 0.2  # share of full contrast that counts as ink for the bounding box


class ImageError(ValueError):
    """This file cannot be turned into a digit; the message says why."""


def find_images(inputs: list[str], recursive: bool) -> Iterator[Path]:
    """Files as given, then each folder's image files in sorted order (sub-folders too with recursive).

    Never raises and never loops: a folder that cannot be listed is yielded itself (load_digit then says why,
    as an error row), and a folder reached twice through links is walked once.
    """
    seen: set[tuple[int, int]] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from _walk(path, recursive, seen)
        else:
            yield path


def _walk(folder: Path, recursive: bool, seen: set[tuple[int, int]]) -> Iterator[Path]:
    try:
        info = folder.stat()
        if (info.st_dev, info.st_ino) in seen:  # a link back up the tree: already walked
            return
        seen.add((info.st_dev, info.st_ino))
        # One folder's listing at a time: memory stays flat however many files there are.
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        yield folder
        return
    for entry in entries:
        if _is_dir(entry):
            if recursive:
                yield from _walk(Path(entry.path), recursive, seen)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield Path(entry.path)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: not a folder; load_digit says what it is
        return False


def check_regular(path: Path) -> None:
    """Only regular files are opened: a pipe or device would block the reader forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError("no such file (or a link to nothing)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:  # a link loop, a name too long
        raise ImageError(f"cannot read ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ImageError("a folder that cannot be listed (permission denied?)")
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file (a pipe, socket or device)")


def load_digit(path: Path) -> np.ndarray:
    """The file as an MNIST-style float32 [28, 28] image in 8-bit steps (k / 255); ImageError with a short
    reason otherwise. Training on a folder stores digit_bytes of the same function, so both see the same pixels."""
    return digit_bytes(path).astype(np.float32) / np.float32(255.0)


def digit_bytes(path: Path) -> np.ndarray:
    """The file as an MNIST-style uint8 [28, 28] digit: the one preprocessing of serving and folder training."""
    check_regular(path)
    try:
        with warnings.catch_warnings():  # the size is refused below in words of ours; Pillow's warning would leak
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise ImageError(f"image too large ({img.width}x{img.height} pixels, limit "
                                 f"{Image.MAX_IMAGE_PIXELS:,})")
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame
            if img.format in EXIF_FORMATS or "exif" in img.info:  # asking other files costs a full decode
                img = ImageOps.exif_transpose(img)
            gray = to_gray(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image too large (over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot decode ({str(e).splitlines()[0][:120] or type(e).__name__})") from None
    if not (gray.shape == (SIZE, SIZE) and _border(gray) < 0.5):  # else already an MNIST-style digit
        gray = mnistify(gray)
    return np.round(gray * np.float32(255.0)).astype(np.uint8)


def to_gray(img: Image.Image) -> np.ndarray:
    """Any mode (8/16/32-bit gray, palette, RGB, CMYK, with or without alpha) -> float32 [H, W] in [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float32)
        return a / (65535.0 if a.max() > 255 else 255.0)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        return a / a.max() if a.max() > 1 else a
    if img.mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    if img.mode == "1":
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return _flatten_alpha(rgba)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Put the picture on a background that contrasts with its visible strokes (dark ink -> white paper)."""
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    visible = alpha > 0.5
    ink = float(gray[visible].mean()) if visible.any() else 0.0
    background = 1.0 if ink < 0.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def _border(gray: np.ndarray) -> float:
    """Median of the edge pixels: the background level, even where a stroke touches the edge."""
    edge = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.partition(edge, edge.size // 2)[edge.size // 2])  # np.median costs 5x more per call


def mnistify(gray: np.ndarray) -> np.ndarray:
    """Light paper is inverted; ink is stretched to [0, 1], cropped, scaled to 20 px and centred by mass."""
    background = _border(gray)
    if background > 0.5:
        gray, background = 1.0 - gray, 1.0 - background
    peak = float(np.percentile(gray, 99.9)) if gray.size > 1000 else float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise ImageError("blank image: no ink found")
    ink = np.clip((gray - background) / (peak - background), 0.0, 1.0)
    rows, cols = np.nonzero(ink > INK_LEVEL)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = BOX / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    digit = np.asarray(Image.fromarray(ink, mode="F").resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    digit = np.clip(digit, 0.0, 1.0)
    total = digit.sum()
    ys, xs = np.indices(digit.shape)
    cy, cx = (ys * digit).sum() / total, (xs * digit).sum() / total
    top = int(np.clip(round(SIZE / 2 - cy - 0.5), 0, SIZE - new_h))
    left = int(np.clip(round(SIZE / 2 - cx - 0.5), 0, SIZE - new_w))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top:top + new_h, left:left + new_w] = digit
    return out


def digit_or_reason(path: Path, load: Callable[[Path], np.ndarray] = digit_bytes) -> np.ndarray | str:
    """load(path), or why the file has no digit; never raises: one bad file (or a decoder bug) costs one
    item, not the run. Serving (load_digit) and folder training (digit_bytes) share this policy."""
    try:
        return load(path)
    except ImageError as e:
        return str(e)
    except Exception as e:  # a decoder bug
        return f"unexpected {type(e).__name__}: {str(e)[:120]}"


def digits_or_reasons(paths: list[Path]) -> list[np.ndarray | str]:
    """digit_bytes of each file, or why it is not one: a whole chunk per call, for process pools."""
    return [digit_or_reason(path) for path in paths]
