"""serve_cli.base.images: every pixel mode Pillow can hand us is read on a stated scale or refused, and one image
can cost only so much memory. Training on folders uses the same function."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, synthetic_digits
from serve_cli.base.images import MAX_PIXELS, ImageError, digit_bytes, digit_of

DIGIT = synthetic_digits(1, seed=5)[0][0]  # uint8 [28, 28], dark background: passes through unscaled
assert DIGIT.max() == 255


def gray(values: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(values).convert(mode) if mode else Image.fromarray(values)


def premultiplied(mode: str) -> Image.Image:
    bands = [DIGIT] * (1 if mode == "La" else 3) + [np.full_like(DIGIT, 255)]  # opaque: premultiplied = straight
    return Image.frombytes(mode, DIGIT.shape[::-1], np.dstack(bands).tobytes())


def palette() -> Image.Image:
    img = Image.fromarray(DIGIT, "L").convert("P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    img.frombytes(DIGIT.tobytes())
    return img


# mode -> the image of DIGIT in it, and the largest difference from DIGIT its conversion may show (the mode's own
# quantisation: HSV, YCbCr and LAB are lossy). Every mode Pillow has must be here: a new one needs a decision.
IN_RANGE = {
    "1": (lambda: Image.fromarray(DIGIT > 127).convert("1"), None),  # two levels: compared with the threshold
    "L": (lambda: gray(DIGIT, "L"), 0),
    "P": (palette, 0),
    "RGB": (lambda: gray(DIGIT, "RGB"), 0),
    "RGBX": (lambda: gray(DIGIT, "RGBX"), 0),
    "CMYK": (lambda: gray(DIGIT, "CMYK"), 0),
    "YCbCr": (lambda: gray(DIGIT, "YCbCr"), 2),
    "HSV": (lambda: gray(DIGIT, "RGB").convert("HSV"), 3),
    "LAB": (lambda: gray(DIGIT, "RGB").convert("LAB"), 8),
    "RGBA": (lambda: gray(DIGIT, "RGBA"), 0),
    "LA": (lambda: gray(DIGIT, "LA"), 0),
    "PA": (lambda: palette().convert("PA"), 0),
    "La": (lambda: premultiplied("La"), 0),
    "RGBa": (lambda: premultiplied("RGBa"), 0),
    "I": (lambda: Image.fromarray(DIGIT.astype(np.int32) * 257), 0),  # 16-bit values in 32 bits
    "I;16": (lambda: Image.fromarray(DIGIT.astype(np.uint16) * 257), 0),
    "I;16L": (lambda: Image.frombytes("I;16L", (28, 28), (DIGIT.astype("<u2") * 257).tobytes()), 0),
    "I;16B": (lambda: Image.frombytes("I;16B", (28, 28), (DIGIT.astype(">u2") * 257).tobytes()), 0),
    "I;16N": (lambda: Image.frombytes("I;16N", (28, 28), (DIGIT.astype("=u2") * 257).tobytes()), 0),
    "F": (lambda: Image.fromarray(DIGIT.astype(np.float32) / 255), 0),
}


def test_every_pillow_mode_has_a_decision() -> None:
    assert set(Image.MODES) <= set(IN_RANGE), set(Image.MODES) - set(IN_RANGE)


@pytest.mark.parametrize("mode", sorted(IN_RANGE))
def test_every_mode_maps_its_gray_onto_the_same_digit(mode: str) -> None:
    make, tolerance = IN_RANGE[mode]
    img = make()
    assert img.mode == mode
    got = digit_of(img).astype(int)
    expected = np.where(DIGIT > 127, 255, 0) if tolerance is None else DIGIT.astype(int)
    assert np.abs(got - expected).max() <= (tolerance or 0), f"{mode}: {np.abs(got - expected).max()}"


@pytest.mark.parametrize("values, scale", [(DIGIT.astype(np.float32), "8-bit values stored as floats"),
                                           (DIGIT.astype(np.int32), "8-bit values stored in 32 bits"),
                                           (DIGIT.astype(np.uint16), "8-bit values stored in 16 bits")])
def test_deep_modes_holding_8_bit_values_read_them_on_the_8_bit_scale(values: np.ndarray, scale: str) -> None:
    assert np.array_equal(digit_of(Image.fromarray(values)), DIGIT), scale


@pytest.mark.parametrize("values, needle", [
    (DIGIT.astype(np.float32) / 127.5 - 0.2, "float pixels from -0.2 to 1.8 fit neither 0-1 nor 0-255"),
    (np.where(DIGIT > 0, np.nan, 0).astype(np.float32), "float pixels"),
    (DIGIT.astype(np.float32) * 2, "float pixels from 0 to 510"),
    (DIGIT.astype(np.int32) * 300, "integer pixels from 0 to 76500 fit neither 0-255 nor 0-65535"),
    (DIGIT.astype(np.int32) - 20, "integer pixels from -20 to 235"),
])
def test_values_outside_every_scale_are_refused(values: np.ndarray, needle: str) -> None:
    with pytest.raises(ImageError, match=needle.replace("(", r"\(")):
        digit_of(Image.fromarray(values))


@pytest.mark.parametrize("values, suffix", [(DIGIT.astype(np.float32) / 127.5 - 0.2, ".tif"),
                                            (DIGIT.astype(np.int32) * 300, ".tif"),
                                            (DIGIT.astype(np.uint16) * 257, ".png")])
def test_files_of_deep_modes_are_read_or_refused_from_disk(tmp_path: Path, values: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(values).save(path)
    if values.dtype == np.uint16:
        assert np.array_equal(digit_bytes(path), DIGIT)
    else:
        with pytest.raises(ImageError, match="pixels from"):
            digit_bytes(path)


# Decoding under an address-space limit: an image over the budget must be refused from its header (before
# Pillow decodes it), one within must decode within the memory the budget promises.
DECODE_UNDER_LIMIT = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
from serve_cli.base.images import digit_or_reason
result = digit_or_reason(Path(sys.argv[1]))
print(result if isinstance(result, str) else f"digit {int(result.sum())}")
"""


def decode_with_memory_limit(path: Path, limit: int) -> str:
    proc = subprocess.run([sys.executable, "-c", DECODE_UNDER_LIMIT, str(path), str(limit)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_an_image_over_the_pixel_budget_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    side = 9400  # 88 M pixels: under Pillow's limit, over ours
    big = np.zeros((side, side, 4), np.uint8)
    big[4000:5000, 4500:4700, 3] = 255  # a black stroke on transparent paper
    Image.fromarray(big, "RGBA").save(tmp_path / "big.png", compress_level=1)
    del big
    line = decode_with_memory_limit(tmp_path / "big.png", 1 << 30)
    assert line == (f"image too large ({side}x{side} pixels; the limit is {MAX_PIXELS:,}, which bounds the memory "
                    f"one image may take): downscale it")


def test_an_image_at_the_budget_decodes_within_the_memory_it_promises(tmp_path: Path) -> None:
    side = 4096
    assert side * side == MAX_PIXELS
    img = np.zeros((side, side, 4), np.uint8)
    img[1000:3000, 1800:2200, 3] = 255
    Image.fromarray(img, "RGBA").save(tmp_path / "at_budget.png", compress_level=1)
    assert decode_with_memory_limit(tmp_path / "at_budget.png", 1 << 30).startswith("digit ")


@pytest.mark.parametrize("width, height, fmt", [(8000, 6000, "JPEG"), (5001, 5001, "JPEG"), (6000, 4000, "MPO")])
def test_a_jpeg_over_the_budget_is_decoded_reduced(tmp_path: Path, width: int, height: int, fmt: str) -> None:
    """48 M pixels (a phone camera's), a side that 2 does not divide, and a camera's multi-picture JPEG."""
    photo = np.full((height, width), 255, np.uint8)
    photo[height // 3:2 * height // 3, width // 2 - 200:width // 2 + 200] = 0
    img = Image.fromarray(photo).convert("RGB")
    path = tmp_path / f"photo.{fmt.lower()}"
    img.save(path, fmt, quality=90, **({"save_all": True, "append_images": [img]} if fmt == "MPO" else {}))
    assert decode_with_memory_limit(path, 1 << 30).startswith("digit ")


def test_floats_a_rounding_above_one_are_on_the_unit_scale() -> None:
    values = DIGIT.astype(np.float32) / 255
    values[values == 1] = np.float32(1.0000001)
    assert values.max() > 1 and np.array_equal(digit_of(Image.fromarray(values)), DIGIT)
