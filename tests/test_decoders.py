"""The fast PNG path (libspng, via pyspng) gives the very pixels of Pillow's path, or steps aside for Pillow.

Serving and folder training share digit_bytes, so a decoder that differed by one level would change what a
model was trained on and what it is asked; the check is bit-identity, over the held-in samples, MNIST's own
test digits as PNG files and every kind of PNG the fast path must refuse."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, real_mnist_raw, synthetic_digits
from serve_cli.base import images
from serve_cli.base.images import ImageError, digit_bytes, fast_gray

pytest.importorskip("pyspng")


def pillow_only(path: Path, monkeypatch) -> np.ndarray | str:
    with monkeypatch.context() as patch:
        patch.setattr(images, "pyspng", None)
        try:
            return digit_bytes(path)
        except ImageError as e:
            return f"ImageError: {e}"


def both(path: Path, monkeypatch) -> tuple[np.ndarray | str, np.ndarray | str]:
    try:
        fast = digit_bytes(path)
    except ImageError as e:
        fast = f"ImageError: {e}"
    return fast, pillow_only(path, monkeypatch)


def mnist_pngs(folder: Path, count: int) -> list[Path]:
    """MNIST's first `count` test digits as 8-bit gray PNG files (synthetic stand-ins without real MNIST)."""
    if real_mnist_raw() is not None:
        from distributed.datasets import read_mnist
        digits = read_mnist(str(real_mnist_raw().parents[1]), train=False)[0][:count].numpy()
    else:
        digits = synthetic_digits(count, seed=5)[0]
    folder.mkdir()
    paths = []
    for i, digit in enumerate(digits):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(digit, mode="L").save(paths[-1])
    return paths


def test_mnist_pngs_and_the_samples_decode_to_the_same_pixels(tmp_path: Path, monkeypatch) -> None:
    paths = mnist_pngs(tmp_path / "mnist", 3000) + sorted(p for p in (ROOT / "launch" / "samples").iterdir()
                                                          if p.suffix != ".py")
    fast_taken = sum(fast_gray(p.read_bytes()) is not None for p in paths)
    assert fast_taken >= 3000, "the fast path was not taken for MNIST's own PNGs"
    for path in paths:
        fast, pillow = both(path, monkeypatch)
        assert isinstance(fast, np.ndarray) and fast.dtype == np.uint8 and np.array_equal(fast, pillow), path


def png(pixels: np.ndarray, mode: str | None, **save) -> bytes:
    out = io.BytesIO()
    (Image.fromarray(pixels, mode=mode) if mode else Image.fromarray(pixels)).save(out, format="PNG", **save)
    return out.getvalue()


def with_exif_orientation(data: bytes, orientation: int) -> bytes:
    """The PNG with an eXIf chunk (a little-endian TIFF header with one Orientation entry) before IDAT."""
    tiff = b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00" * 4
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def adam7_png(pixels: np.ndarray) -> bytes:
    """An interlaced (Adam7) 8-bit gray PNG: each pass's rows, filter type 0, in one IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b"".join(b"".join(b"\x00" + row.tobytes() for row in pixels[y0::dy, x0::dx])
                   for x0, y0, dx, dy in passes if pixels[y0::dy, x0::dx].size)
    h, w = pixels.shape
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


DIGIT = synthetic_digits(1, seed=11)[0][0]  # 28x28, bright bars on a dark, noisy ground
LARGE = np.kron(255 - DIGIT, np.ones((5, 5), dtype=np.uint8))  # dark ink on white paper, 140x140


@pytest.mark.parametrize("name,data,fast", [
    ("gray 28x28", png(DIGIT, "L"), True),
    ("gray 28x28, dark ink on white paper (inverted)", png(255 - DIGIT, "L"), True),
    ("gray 140x140 on white paper (inverted, cropped, scaled)", png(LARGE, "L"), True),
    ("gray interlaced", None, True),
    ("gray 16-bit", png(DIGIT.astype(np.uint16) * 257, None), False),
    ("rgb", png(np.stack([DIGIT] * 3, -1), "RGB"), False),
    ("gray + alpha", png(np.stack([DIGIT, np.full_like(DIGIT, 200)], -1), "LA"), False),
    ("palette", None, False),
    ("gray with EXIF orientation 6", with_exif_orientation(png(LARGE[:, :100], "L"), 6), False),
])
def test_each_kind_of_png_gives_pillows_pixels(name: str, data: bytes | None, fast: bool, tmp_path: Path,
                                                monkeypatch) -> None:
    if name == "gray interlaced":  # Pillow writes no Adam7, but reads it, as libspng does
        data = adam7_png(LARGE)
    if name == "palette":
        data = png(DIGIT, "L")
        img = Image.open(io.BytesIO(data)).convert("P")
        out = io.BytesIO()
        img.save(out, format="PNG")
        data = out.getvalue()
    path = tmp_path / "image.png"
    path.write_bytes(data)
    assert (fast_gray(data) is not None) == fast
    got, pillow = both(path, monkeypatch)
    assert isinstance(got, np.ndarray) and np.array_equal(got, pillow), name


def test_a_png_libspng_refuses_goes_to_pillow_which_words_the_error(tmp_path: Path, monkeypatch) -> None:
    data = png(LARGE, "L")
    broken = data[:data.index(b"IDAT") + 20] + b"\x00" * 40  # the header is fine, the pixels are cut short
    path = tmp_path / "cut.png"
    path.write_bytes(broken)
    assert fast_gray(broken) is None
    got, pillow = both(path, monkeypatch)
    assert got == pillow and got.startswith("ImageError: cannot decode")


def test_an_image_over_the_pixel_budget_is_refused_by_pillows_words(tmp_path: Path, monkeypatch) -> None:
    header = png(DIGIT, "L")
    ihdr = struct.pack(">IIBBBBB", 5000, 5000, 8, 0, 0, 0, 0)  # 25 M pixels in the header
    huge = header[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) \
        + header[33:]
    path = tmp_path / "huge.png"
    path.write_bytes(huge)
    assert fast_gray(huge) is None
    got, pillow = both(path, monkeypatch)
    assert got == pillow and "image too large" in got


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def inserted(data: bytes, extra: bytes) -> bytes:
    """`extra` chunks placed just after IHDR."""
    return data[:33] + extra + data[33:]


@pytest.mark.parametrize("name,data", [
    ("a bad CRC on IHDR", png(LARGE, "L")[:29] + b"\x00\x00\x00\x00" + png(LARGE, "L")[33:]),
    ("a bad CRC on a text chunk", inserted(png(LARGE, "L"), chunk(b"tEXt", b"Comment\x00hi", crc=1))),
    ("an animation (acTL)", inserted(png(LARGE, "L"), chunk(b"acTL", struct.pack(">II", 1, 0)))),
    ("compressed text (zTXt)", inserted(png(LARGE, "L"), chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"x")))),
])
def test_a_png_pillow_may_read_otherwise_is_left_to_pillow(name: str, data: bytes, tmp_path: Path,
                                                           monkeypatch) -> None:
    """libspng, as pyspng sets it, ignores CRCs, and reads animations and text its own way: such files go to
    Pillow, which decides (a bad CRC is an error row, as it always was)."""
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert fast_gray(data) is None
    got, pillow = both(path, monkeypatch)
    assert (got == pillow) if isinstance(got, str) else np.array_equal(got, pillow), name


@pytest.mark.parametrize("edge", [127, 128])
def test_the_mnist_shortcut_ends_where_the_float_paths_border_test_does(edge: int, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A 28x28 image with a border median of 127 is an MNIST digit as it is; 128 is light paper, inverted."""
    pixels = DIGIT.copy()
    pixels[0, :], pixels[-1, :], pixels[:, 0], pixels[:, -1] = edge, edge, edge, edge
    path = tmp_path / "edge.png"
    path.write_bytes(png(pixels, "L"))
    got, pillow = both(path, monkeypatch)
    assert np.array_equal(got, pillow) and np.array_equal(got, pixels) == (edge == 127)


def test_a_real_png_over_the_pixel_budget_gets_pillows_refusal(tmp_path: Path, monkeypatch) -> None:
    data = png(np.zeros((4200, 4200), np.uint8), "L")  # 17.6 M pixels in a small file
    assert len(data) < images.FAST_MAX_BYTES
    path = tmp_path / "big.png"
    path.write_bytes(data)
    assert fast_gray(data) is None
    got, pillow = both(path, monkeypatch)
    assert got == pillow and "image too large (4200x4200 pixels" in got


@pytest.mark.parametrize("high", [54, 55, 56, 57])
def test_the_border_count_is_the_border_median(high: int) -> None:
    """dark_border28 counts edge values of 128 and up instead of sorting them; it must say what the median says,
    at the counts either side of the median's rank, wherever on the edge the light pixels fall."""
    rng = np.random.default_rng(high)
    for _ in range(200):
        pixels = rng.integers(0, 128, (28, 28), dtype=np.uint8)
        light = rng.choice(images.EDGE28.size, high, replace=False)  # positions in the 112 (corners twice)
        flat = pixels.reshape(-1)
        flat[images.EDGE28[light]] = rng.integers(128, 256, high, dtype=np.uint8)
        assert images.dark_border28(pixels) == (images._border(pixels) < 128), (high, images._border(pixels))


def test_a_file_that_grew_since_its_stat_is_read_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "grown.png"
    data = bytes(range(256)) * 40
    path.write_bytes(data)
    assert images.read_whole(str(path), 100) == data  # the stat said 100 bytes; 10,240 are there now
    assert images.read_whole(str(path), len(data)) == data


def test_a_fifo_swapped_in_after_the_stat_is_not_waited_on(tmp_path: Path) -> None:
    """read_whole opens what check_regular passed without blocking: a FIFO put in the file's place since reads
    as empty (an error row) instead of waiting forever for a writer."""
    import os
    import threading
    fifo = tmp_path / "swapped.png"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(images.read_whole(str(fifo), 100)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # release the blocked reader before failing
        with open(fifo, "wb"):
            pass
    assert got == [b""], "read_whole waited for a FIFO's writer"
