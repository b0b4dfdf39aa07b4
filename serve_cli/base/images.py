"""Decode any image Pillow reads and turn it into an MNIST-style digit: float32 [28, 28] in [0, 1].

MNIST digits are bright ink on black, the ink's bounding box scaled to 20 px on its longest side and
placed so that its centre of mass sits at the centre of the 28x28 field. An image that already is
such a digit (28x28 with a dark background, 8- or 16-bit, gray or colour) passes through untouched,
so MNIST test images saved as PNG give exactly the in-memory predictions.
"""
from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libspng: 8-bit gray PNGs (MNIST's own kind) decoded 7x faster than Pillow, to the same pixels
    import pyspng
except ImportError:  # a platform without its wheel: Pillow decodes everything
    pyspng = None

SIZE, BOX = 28, 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
                  ".pnm"}
EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "WEBP"}  # formats whose orientation tag is read at open
MIN_CONTRAST = 0.08  # below this the picture holds no ink worth reading
INK_LEVEL = 0.2  # share of full contrast that counts as ink for the bounding box
# Pixels one image may have: 4096 x 4096, a fifth of Pillow's own limit. Preprocessing costs up to ~35 bytes a
# pixel (float copies), so ~0.6 GB at most per image and decoding worker; a 12-megapixel photo fits.
MAX_PIXELS = 2 ** 24
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST_MAX_BYTES = 1 << 20  # a larger file goes to Pillow, which reads it as it decodes instead of all at once


class ImageError(ValueError):
    """This file cannot be turned into a digit; the message says why."""


def find_images(inputs: list[str], recursive: bool) -> Iterator[str]:
    """Files as given, then each folder's image files in sorted order (sub-folders too with recursive), as
    paths in text: a Path per file costs more than listing it.

    Never raises and never loops: a folder that cannot be listed is yielded itself (digit_bytes then says why,
    as an error row), and a folder reached twice through links is walked once.
    """
    seen: set[tuple[int, int]] = set()
    for item in inputs:
        path = str(Path(item))  # spelled as Path spells it: "a//b/./c" as "a/b/c"
        if os.path.isdir(path):
            yield from _walk(path, recursive, seen)
        else:
            yield path


def _walk(top: str, recursive: bool, seen: set[tuple[int, int]]) -> Iterator[str]:
    """Depth first, each folder's entries in sorted order, from a stack of listings rather than recursion: a
    tree as deep as the file system allows is walked (Python's recursion limit is about 1,000 levels)."""
    listings: list[Iterator[os.DirEntry]] = []
    folder: str | None = top
    cut = 2 if top == "." else 0  # "./a.png" spelled "a.png", as Path spells it; deeper paths then start "sub/"
    while True:
        if folder is not None:
            entries = _listing(folder, seen)
            if entries is None:
                yield folder  # cannot be listed (too deep to open, permission denied): its error row
            else:
                listings.append(iter(entries))
            folder = None
        if not listings:
            return
        entry = next(listings[-1], None)
        if entry is None:
            listings.pop()
        elif _is_dir(entry):
            folder = entry.path[cut * (len(listings) == 1):] if recursive else None
        elif image_name(entry.name):
            yield entry.path[cut * (len(listings) == 1):]


def image_name(name: str) -> bool:
    """Whether os.path.splitext(name)[1].lower() is in IMAGE_SUFFIXES (a name of dots and a suffix, ".png", has
    none), without its Python-level function call per file."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_SUFFIXES and bool(name[:dot].lstrip("."))


def _listing(folder: str, seen: set[tuple[int, int]]) -> list[os.DirEntry] | None:
    """The folder's entries, sorted by name; [] for a folder already walked; None when it cannot be listed."""
    try:
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:  # a link back up the tree: already walked
            return []
        seen.add((info.st_dev, info.st_ino))
        # One folder's listing at a time per level: memory stays flat however many files there are.
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: not a folder; digit_bytes says what it is
        return False


def check_regular(path: str | os.PathLike) -> os.stat_result:
    """Only regular files are opened: a pipe or device would block the reader forever."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError("no such file (or a link to nothing)") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:  # a link loop, a name too long
        raise ImageError(f"cannot read ({e.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError("a folder that cannot be listed (permission denied?)")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("not a regular file (a pipe, socket or device)")
    return info


def digit_bytes(path: str | os.PathLike) -> np.ndarray:
    """The file as an MNIST-style uint8 [28, 28] digit: the one preprocessing of serving and folder training.
    A small 8-bit gray PNG takes libspng's path (fast_gray); every other file, and any the fast path refuses,
    Pillow's. Both give the same pixels (tests/test_decoders.py)."""
    size = check_regular(path).st_size
    source: str | os.PathLike | io.BytesIO = path
    if size <= FAST_MAX_BYTES:
        data = read_whole(path, size)
        gray = fast_gray(data)
        if gray is not None:
            return digit_of_gray8(gray)
        source = io.BytesIO(data)
    try:
        with warnings.catch_warnings():  # the size is refused below in words of ours; Pillow's warning would leak
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        with img:
            img.seek(0)  # animated GIF/WebP/TIFF: the first frame
            within_budget(img)
            if img.format in EXIF_FORMATS or "exif" in img.info:  # asking other files costs a full decode
                img = ImageOps.exif_transpose(img)
            return digit_of(img)
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


# os.open's flags for a file check_regular passed: a FIFO or tty put in its place since opens without blocking or
# becoming our terminal (its read then fails, as an error row); O_BINARY keeps Windows from translating line ends.
READ_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0) | \
    getattr(os, "O_NONBLOCK", 0)


def read_whole(path: str | os.PathLike, size: int) -> bytes:
    """A small regular file's bytes, `size` from its stat: one open and one read of size + 1 bytes (which
    returns `size` when the file is as its stat said), without a file object; twice as fast as open().read()
    per file here."""
    try:
        fd = os.open(path, READ_FLAGS)
        try:
            data = os.read(fd, size + 1)
            if len(data) != size:  # it changed since the stat, or a file system read short: read on to its end
                parts = [data]
                while part := os.read(fd, FAST_MAX_BYTES):
                    parts.append(part)
                data = b"".join(parts)
        finally:
            os.close(fd)
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read ({e.strerror})") from None
    return data


def fast_gray(data: bytes) -> np.ndarray | None:
    """An 8-bit gray PNG's pixels (uint8 [H, W]) decoded by libspng; None for anything else, and for any file
    libspng refuses or whose header says more than MAX_PIXELS, so that Pillow decides (and words the error).
    So does any file plain_png does not pass."""
    if pyspng is None or len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    if depth != 8 or color != 0 or width * height > MAX_PIXELS or not plain_png(data):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:  # libspng's own errors: Pillow reads the file again and says what is wrong with it
        return None
    return pixels if pixels.shape == (height, width) and pixels.dtype == np.uint8 else None


def within_budget(img: Image.Image) -> None:
    """Refuse, from the header and before decoding, an image over MAX_PIXELS; a JPEG is decoded reduced
    instead (1/2 to 1/8 of each side, from its DCT), which costs no more than an image within the budget."""
    pixels = img.width * img.height
    if pixels > MAX_PIXELS and img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with more frames
        reduce = 2 ** math.ceil(math.log2(math.sqrt(pixels / MAX_PIXELS)))  # per side: 2, 4 or 8 for JPEG
        # Pillow takes the largest scale whose result is at least the size asked: w // reduce gives `reduce`
        img.draft(img.mode, (img.width // reduce, img.height // reduce))
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"image too large ({img.width}x{img.height} pixels; the limit is {MAX_PIXELS:,}, which "
                         f"bounds the memory one image may take): downscale it")


# Chunks whose meaning libspng and Pillow may not share: an animation (Pillow takes its first frame's box),
# compressed text (Pillow caps its size), EXIF (its orientation must be applied).
PILLOW_ONLY_CHUNKS = {b"acTL", b"fcTL", b"fdAT", b"zTXt", b"iTXt", b"eXIf"}


def plain_png(data: bytes) -> bool:
    """Whether every chunk up to IEND is whole, has a correct CRC (libspng, as pyspng sets it, ignores CRCs
    while Pillow refuses a bad one) and is not one of PILLOW_ONLY_CHUNKS."""
    pos, end = 8, len(data)
    view = memoryview(data)  # the CRC reads each chunk in place
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        stop = pos + 12 + length
        if stop > end or kind in PILLOW_ONLY_CHUNKS:
            return False
        if zlib.crc32(view[pos + 4:stop - 4]) != struct.unpack_from(">I", data, stop - 4)[0]:
            return False
        if kind == b"IEND":
            return True
        pos = stop
    return False


def digit_of(img: Image.Image) -> np.ndarray:
    """A decoded image (any mode) as an MNIST-style uint8 [28, 28] digit."""
    return digit_of_gray(to_gray(img))


def digit_of_gray(gray: np.ndarray) -> np.ndarray:
    """Gray float32 [H, W] in [0, 1] as an MNIST-style uint8 [28, 28] digit."""
    if not (gray.shape == (SIZE, SIZE) and _border(gray) < 0.5):  # else already an MNIST-style digit
        gray = mnistify(gray)
    # to_gray keeps [0, 1]; the clip only keeps float rounding (1 + 1 ulp) from wrapping to black
    return np.round(np.clip(gray, 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def digit_of_gray8(pixels: np.ndarray) -> np.ndarray:
    """8-bit gray uint8 [H, W] as digit_of_gray(pixels / 255) would give it. An MNIST-style 28x28 digit is
    returned as it is: k / 255 * 255 rounds back to k, so the float round trip would change nothing."""
    if pixels.shape == (SIZE, SIZE) and dark_border28(pixels):
        return np.array(pixels, dtype=np.uint8)
    return digit_of_gray(pixels.astype(np.float32) / np.float32(255.0))


INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16- and 32-bit integer gray
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
LUMINANCE_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")


def to_gray(img: Image.Image) -> np.ndarray:
    """Any mode Pillow hands us -> float32 [H, W] in [0, 1], or ImageError (the README's "Pixel values"):

    - integer gray (I;16*, I): on the 8-bit scale (/255) when no value exceeds 255, else the 16-bit one (/65535);
      values below 0 or above 65535 fit neither and are refused;
    - float gray (F): [0, 1] as it is, else [0, 255] on the 8-bit scale, each with half an 8-bit step to
      spare above (1.0000001 is rounding, not another scale); values outside both, NaN or infinity are
      refused (a normalised tensor saved as an image has no scale we could know);
    - with alpha (RGBA, LA, PA, La, RGBa, P with transparency): flattened onto a background that contrasts with
      the visible strokes;
    - the others (1, L, P, RGB, RGBX, CMYK, YCbCr, HSV, LAB): Pillow's luminance, L = 0.299 R + 0.587 G + 0.114 B
      (LAB through RGB, which Pillow converts it to).
    """
    mode = img.mode
    if mode in INTEGER_MODES:
        return _on_a_scale(np.asarray(img).astype(np.float32), (255.0, 65535.0), "integer")
    if mode == "F":
        return _on_a_scale(np.asarray(img, dtype=np.float32), (1.0, 255.0), "float", slack=0.5 / 255)
    if mode == "P" and "transparency" in img.info or mode in ALPHA_MODES:
        if mode != "RGBA":
            img = (img.convert("LA") if mode == "La" else img).convert("RGBA")  # Pillow has no La -> RGBA
        rgba = np.asarray(img, dtype=np.float32)
        rgba /= np.float32(255.0)  # in place: a large image's float copy is the most memory it costs
        return _flatten_alpha(rgba)
    if mode in LUMINANCE_MODES:
        return np.asarray((img.convert("RGB") if mode == "LAB" else img).convert("L"), dtype=np.float32) / 255.0
    raise ImageError(f"pixel mode {mode} is not one this tool reads: save the image as 8-bit gray or RGB")


def _on_a_scale(a: np.ndarray, scales: tuple[float, ...], kind: str, slack: float = 0.0) -> np.ndarray:
    """Gray values divided by the first scale they all fit in: [0, top * (1 + slack)] (digit_of clips what is
    over); ImageError when they fit none."""
    low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if math.isfinite(low) and math.isfinite(high) and low >= 0:
        for top in scales:
            if high <= top * (1 + slack):
                return a / np.float32(top)
    names = " nor ".join(f"0-{top:g}" for top in scales)
    raise ImageError(f"{kind} pixels from {low:g} to {high:g} fit neither {names}: save the image with values in "
                     f"one of those ranges")


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Put the picture on a background that contrasts with its visible strokes (dark ink -> white paper)."""
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    alpha = rgba[..., 3]
    visible = alpha > 0.5
    ink = float(gray[visible].mean()) if visible.any() else 0.0
    background = 1.0 if ink < 0.5 else 0.0
    gray *= alpha
    gray += background * (1.0 - alpha)
    return gray


# A 28x28 image's edge pixels as _border takes them (rows 0 and 27, then columns 0 and 27: corners twice), as
# indices into the flattened image; the median is the one of rank 56 of these 112.
EDGE28 = np.concatenate([np.arange(SIZE), (SIZE - 1) * SIZE + np.arange(SIZE), SIZE * np.arange(SIZE),
                         SIZE * np.arange(SIZE) + SIZE - 1])
EDGE28_MEDIAN_RANK = EDGE28.size // 2


def dark_border28(pixels: np.ndarray) -> bool:
    """_border(pixels) < 128 for 28x28 uint8 pixels (k / 255 < 0.5 exactly when k < 128), counted rather than
    sorted: the rank-56 edge value is below 128 when at most 112 - 57 edge values are 128 or more."""
    return int(np.count_nonzero(pixels.take(EDGE28) >= 128)) <= EDGE28.size - EDGE28_MEDIAN_RANK - 1


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


def digit_or_reason(path: str | os.PathLike, load: Callable[[str | os.PathLike], np.ndarray] = digit_bytes
                    ) -> np.ndarray | str:
    """load(path), or why the file has no digit; never raises: one bad file (or a decoder bug) costs one
    item, not the run. Serving (serve_cli.pool) and folder training share this policy."""
    try:
        return load(path)
    except ImageError as e:
        return str(e)
    except Exception as e:  # a decoder bug
        return f"unexpected {type(e).__name__}: {str(e)[:120]}"


def digits_or_reasons(paths: list[Path]) -> list[np.ndarray | str]:
    """digit_bytes of each file, or why it is not one: a whole chunk per call, for process pools."""
    return [digit_or_reason(path) for path in paths]
