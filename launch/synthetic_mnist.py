"""Tiny learnable stand-ins for MNIST, as IDX files where torchvision's MNIST looks first (so it never tries
to download): the test suite's data, and the data of launch/container.sh smoke inside the image.

  python launch/synthetic_mnist.py ROOT [--train N] [--test N]     ->  ROOT/MNIST/raw/*-ubyte
"""
from __future__ import annotations

import argparse
import struct
from pathlib import Path

import numpy as np


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: digit d is a bright bar pattern at a d-dependent place, jittered, noisy."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, d in enumerate(labels):
        dy, dx = rng.integers(-2, 3, size=2)
        r, c = 4 + (d // 4) * 7 + dy, 4 + (d % 4) * 5 + dx
        images[i, r:r + 6, c:c + 4] = 255
        images[i, 22:25, 2 + 2 * d:4 + 2 * d] = 200  # a second cue, so tiny nets learn it fast
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_synthetic_mnist(root: Path, n_train: int = 640, n_test: int = 200, seed: int = 0,
                          folder: str = "MNIST") -> Path:
    """Uncompressed IDX files where torchvision's MNIST (or FashionMNIST, KMNIST: `folder`) looks first."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = synthetic_digits(n, s)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=640)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    print(write_synthetic_mnist(args.root, args.train, args.test))
