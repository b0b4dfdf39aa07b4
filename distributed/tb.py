"""TensorBoard for rank 0: scalars, image galleries, a confusion matrix, PR curves, the projector, hparams.

Only rank 0 makes one (report.Reporter, which holds the run's one rank-0 guard). What to show is decided in
report.py; this module only knows how to draw and write it.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from serve_cli.base.files import atomic_write


RIGHT, WRONG = (0, 130, 0), (210, 0, 0)


class TensorBoardLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: pulls in tensorboard
        self.log_dir = log_dir
        # purge_step drops events a crashed run wrote past its last checkpoint, so steps never rewind.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int | None = None) -> None:
        self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, markdown: str, step: int) -> None:
        self.writer.add_text(tag, markdown, step)

    def pr_curve(self, tag: str, is_class: torch.Tensor, probability: torch.Tensor, step: int) -> None:
        self.writer.add_pr_curve(tag, is_class.numpy(), probability.numpy(), step)

    def layout(self, charts: dict[str, list[str]]) -> None:
        """Custom Scalars tab: one chart per name, one line per tag matching its regexes."""
        self.writer.add_custom_scalars({"per class (test set)": {name: ["Multiline", regexes]
                                                                 for name, regexes in charts.items()}})

    def projector(self, features: torch.Tensor, metadata: list[list[str]], header: Sequence[str],
                  images: torch.Tensor) -> None:
        """The Projector tab's files, each written atomically (SummaryWriter.add_embedding writes in place)."""
        folder = self.log_dir / "projector"
        folder.mkdir(exist_ok=True)
        rows = "\n".join("\t".join(f"{v:.5g}" for v in row) for row in features.tolist())
        write_bytes(folder / "tensors.tsv", (rows + "\n").encode())
        lines = ["\t".join(header)] + ["\t".join(clean_cell(c) for c in row) for row in metadata]
        write_bytes(folder / "metadata.tsv", ("\n".join(lines) + "\n").encode())
        write_bytes(folder / "sprite.png", png_bytes(sprite(images)))
        height, width = images.shape[-2:]
        config = ('embeddings {\n  tensor_name: "test_features"\n  tensor_path: "projector/tensors.tsv"\n'
                  '  metadata_path: "projector/metadata.tsv"\n  sprite {\n    image_path: "projector/sprite.png"\n'
                  f'    single_image_dim: {width}\n    single_image_dim: {height}\n  }}\n}}\n')
        write_bytes(self.log_dir / "projector_config.pbtxt", config.encode())

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, example)
        except Exception as e:  # the graph is a nicety; never fail a run over it
            print(f"warning: model graph not written to TensorBoard ({type(e).__name__}: {e})")

    def hparams(self, hparams: dict[str, Any], metric_tags: Sequence[str], apart: Sequence[str]) -> None:
        """The HParams tab's row for this run. Its metric columns read the last value of existing scalar
        curves, so no lone-point scalars clutter the Time Series tab.

        What TensorBoard (2.21) honours, read from its code and checked in the browser: the experiment's
        hparams are sorted by (not `differs`, name) and the HParams table ticks the first five, so the names
        in `apart` are declared as differing (they tell runs apart) and come first; the order they are
        written in is not kept. Every number is shown with 5 significant digits (64 as 64.000), so whole
        numbers and booleans are written as text (no domain: a one-run domain would filter other runs out)."""
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
        from torch.utils.tensorboard.summary import hparams as hparams_summary
        clean = {k: v if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
                 for k, v in hparams.items()}
        # Written into this run's own event file (add_hparams would start a separate sub-run).
        experiment, start, end = hparams_summary(clean, dict.fromkeys(metric_tags, 0.0))
        value = experiment.value[0]
        data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            info.differs = info.name in apart
        value.metadata.plugin_data.content = data.SerializeToString()
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.close()


def tag_name(text: str) -> str:
    """A class name as a TensorBoard tag component ('T-shirt/top' -> 'T-shirt_top')."""
    return re.sub(r"[^\w.\-]", "_", text)


def clean_cell(text: str) -> str:
    return re.sub(r"[\t\n\r]", " ", text)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def tile_grid(images: torch.Tensor, captions: Sequence[str], wrong: Sequence[bool], columns: int = 4,
              scale: int = 3, font_size: int = 22) -> np.ndarray:
    """uint8 [N, H, W] images as an RGB grid, each captioned below; wrong ones framed and captioned in red."""
    height, width = images.shape[-2:]
    face = font(font_size)
    cell_w = max(width * scale, max((int(face.getlength(c)) for c in captions), default=0)) + 10
    cell_h = height * scale + font_size + 12
    rows = max(1, -(-len(images) // columns))
    canvas = Image.new("RGB", (min(columns, max(1, len(images))) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, img in enumerate(images.cpu().numpy()):
        x, y = (i % columns) * cell_w + 5, (i // columns) * cell_h + 4
        tile = Image.fromarray(img, mode="L").resize((width * scale, height * scale), Image.NEAREST)
        canvas.paste(tile.convert("RGB"), (x, y))
        colour = WRONG if wrong[i] else RIGHT
        if wrong[i]:
            draw.rectangle((x - 3, y - 3, x + width * scale + 2, y + height * scale + 2), outline=colour, width=3)
        draw.text((x, y + height * scale + 4), captions[i], fill=colour, font=face)
    return np.asarray(canvas)


def note_image(text: str, font_size: int = 22) -> np.ndarray:
    """A line of text as a picture, where an image tag has nothing to show this time."""
    face = font(font_size)
    canvas = Image.new("RGB", (int(face.getlength(text)) + 20, font_size + 20), "white")
    ImageDraw.Draw(canvas).text((10, 10), text, fill=RIGHT, font=face)
    return np.asarray(canvas)


def confusion_image(matrix: torch.Tensor, classes: Sequence[str], cell: int = 44,
                    title: str = "predicted") -> np.ndarray:
    """Rows are true classes, columns predicted; shade by row-normalised count, counts written in."""
    n = len(classes)
    margin = 56
    face = font(16)
    canvas = Image.new("RGB", (margin + n * cell, margin + n * cell), "white")
    draw = ImageDraw.Draw(canvas)
    m = matrix.to(torch.float64)
    share = (m / m.sum(1, keepdim=True).clamp(min=1)).numpy()
    for t in range(n):
        draw.text((4, margin + t * cell + cell // 3), classes[t][:5], fill="black", font=face)
        draw.text((margin + t * cell + 4, 20), classes[t][:5], fill="black", font=face)
        for p in range(n):
            shade = int(255 * (1 - share[t, p]))
            box = (margin + p * cell, margin + t * cell, margin + (p + 1) * cell - 1, margin + (t + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 4, box[1] + cell // 3), str(int(matrix[t, p])),
                      fill="white" if shade < 128 else "black", font=face)
    draw.text((margin, 2), title, fill="black", font=face)
    return np.asarray(canvas)


def sprite(images: torch.Tensor) -> np.ndarray:
    """The projector's sprite: uint8 [N, H, W] thumbnails in a square grid, row-major."""
    n, height, width = images.shape
    side = max(1, int(np.ceil(np.sqrt(n))))
    sheet = np.zeros((side * height, side * width), dtype=np.uint8)
    for i, img in enumerate(images.cpu().numpy()):
        r, c = divmod(i, side)
        sheet[r * height:(r + 1) * height, c * width:(c + 1) * width] = img
    return sheet


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def png_bytes(array: np.ndarray) -> bytes:
    from io import BytesIO
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
