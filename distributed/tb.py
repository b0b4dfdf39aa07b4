"""TensorBoard for rank 0: scalars, a prediction grid, a confusion matrix, the graph and hparams.

Other ranks get a NullLogger, so the training loop never asks which rank it is on.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .dist import DistEnv


class NullLogger:
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def predictions(self, images: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor,
                    classes: Sequence[str], step: int) -> None: ...
    def confusion(self, matrix: torch.Tensor, classes: Sequence[str], step: int) -> None: ...
    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None: ...
    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: pulls in tensorboard
        # purge_step drops events a crashed run wrote past its last checkpoint, so steps never rewind.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def predictions(self, images: torch.Tensor, predicted: torch.Tensor, true: torch.Tensor,
                    classes: Sequence[str], step: int) -> None:
        grid = prediction_grid(images, predicted.tolist(), true.tolist(), classes)
        self.writer.add_image("test/predictions", grid, step, dataformats="HWC")

    def confusion(self, matrix: torch.Tensor, classes: Sequence[str], step: int) -> None:
        self.writer.add_image("test/confusion_matrix", confusion_image(matrix, classes), step,
                              dataformats="HWC")

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, example)
        except Exception as e:  # the graph is a nicety; never fail a run over it
            print(f"warning: model graph not written to TensorBoard ({type(e).__name__}: {e})")

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        # Written into this run's own event file (add_hparams would start a separate sub-run).
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, metrics):
            self.writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value)

    def close(self) -> None:
        self.writer.close()


def open_logger(env: DistEnv, log_dir: Path, purge_step: int | None = None) -> NullLogger:
    return TensorBoardLogger(log_dir, purge_step) if env.is_main else NullLogger()


def prediction_grid(images: torch.Tensor, predicted: Sequence[int], true: Sequence[int],
                    classes: Sequence[str], columns: int = 8, scale: int = 2) -> np.ndarray:
    """Images uint8 [N, 28, 28] as an RGB grid, each captioned 'pred/true', green when right, red when wrong."""
    cell_w, caption = 28 * scale + 8, 12
    cell_h = 28 * scale + caption + 4
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images.cpu().numpy()):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 2
        tile = Image.fromarray(img, mode="L").resize((28 * scale, 28 * scale), Image.NEAREST)
        canvas.paste(tile.convert("RGB"), (x, y))
        colour = (0, 140, 0) if predicted[i] == true[i] else (210, 0, 0)
        draw.text((x, y + 28 * scale + 1), f"{classes[predicted[i]]}/{classes[true[i]]}", fill=colour)
    return np.asarray(canvas)


def confusion_image(matrix: torch.Tensor, classes: Sequence[str], cell: int = 36) -> np.ndarray:
    """Rows are true classes, columns predicted; shade by row-normalised count, counts written in."""
    n = len(classes)
    margin = 28
    canvas = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(canvas)
    m = matrix.to(torch.float64)
    share = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    for t in range(n):
        draw.text((4, margin + t * cell + cell // 3), classes[t][:4], fill="black")
        draw.text((margin + t * cell + 4, 8), classes[t][:4], fill="black")
        for p in range(n):
            shade = int(255 * (1 - share[t, p]))
            box = (margin + p * cell, margin + t * cell, margin + (p + 1) * cell - 1, margin + (t + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 3, box[1] + cell // 3), str(int(matrix[t, p])),
                      fill="white" if shade < 128 else "black")
    return np.asarray(canvas)
