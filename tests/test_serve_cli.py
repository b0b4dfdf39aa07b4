"""serve_cli predict/info: parity with in-memory predictions, robustness to real-world images, bad input."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import ROOT, synthetic_digits
from serve_cli.base.manifest import seal
from serve_cli.__main__ import main
from serve_cli.base.images import digit_bytes


def load_digit(path: Path) -> np.ndarray:
    """What a serve_cli worker hands its model for one file: digit_bytes in [0, 1] (serve_cli.pool.process_batch)."""
    return digit_bytes(path).astype(np.float32) / np.float32(255.0)


def save_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:05d}.png")
        Image.fromarray(img, mode="L").save(paths[-1])
    return paths


def in_memory_predictions(export_dir: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = (images.astype(np.float32) / 255.0)[:, None]
    return session.run(None, {"images": x})[0].argmax(1)


def predict_jsonl(capsys, *args: str) -> tuple[int, list[dict]]:
    code = main(["predict", *args, "--format", "jsonl"])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_pngs_of_test_images_match_in_memory_predictions(exported_run: Path, tmp_path: Path, capsys) -> None:
    images, _ = synthetic_digits(200, seed=1)
    save_pngs(tmp_path / "pngs", images)
    code, rows = predict_jsonl(capsys, str(tmp_path / "pngs"), "--model", str(exported_run), "--batch-size", "64")
    assert code == 0 and len(rows) == 200
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert [r["index"] for r in rows] == in_memory_predictions(exported_run, images).tolist()


def test_mnist_test_set_as_png_equals_in_memory(mnist_export: Path, real_data: Path, tmp_path: Path, capsys) -> None:
    from distributed.datasets import read_mnist
    images, digits = read_mnist(real_data, train=False)
    images = images.numpy()
    save_pngs(tmp_path / "pngs", images)
    code, rows = predict_jsonl(capsys, str(tmp_path / "pngs"), "--model", str(mnist_export))
    assert code == 0 and len(rows) == 10000
    predicted = np.array([r["index"] for r in rows])
    assert np.array_equal(predicted, in_memory_predictions(mnist_export, images))  # all 10,000
    manifest = json.loads((mnist_export / "manifest.json").read_text())
    assert (predicted == digits.numpy()).mean() == pytest.approx(
        manifest["parity"]["runtimes"]["onnxruntime"]["accuracy"])


def variants(img: np.ndarray) -> dict[str, Image.Image]:
    """What users feed: one MNIST digit as a scan, a photo, a drawing on a canvas."""
    gray = Image.fromarray(img, mode="L")
    big = gray.resize((112, 112), Image.BILINEAR)
    inverted = Image.fromarray(255 - img, mode="L")
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = img  # black strokes whose alpha is the ink: a drawing app's transparent export
    canvas = Image.new("L", (80, 60), 0)
    canvas.paste(gray, (45, 3))
    jpeg = io.BytesIO()
    Image.fromarray(255 - np.asarray(big), mode="L").convert("RGB").save(jpeg, "JPEG", quality=70)
    return {
        "inverted": inverted,
        "rgb": gray.convert("RGB"),
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "upscaled": big,
        "jpeg_dark_on_light": Image.open(io.BytesIO(jpeg.getvalue())),
        "off_centre": canvas,
        "16bit": Image.fromarray(img.astype(np.uint16) * 257),
    }


def test_real_world_variants_are_still_recognised(mnist_export: Path, real_data: Path, tmp_path: Path,
                                                  capsys) -> None:
    from distributed.datasets import read_mnist
    images, digits = read_mnist(real_data, train=False)
    n = 100
    for i in range(n):
        for name, img in variants(images[i].numpy()).items():
            folder = tmp_path / name
            folder.mkdir(exist_ok=True)
            img.save(folder / f"{i:03d}.png")
    for name in variants(images[0].numpy()):
        code, rows = predict_jsonl(capsys, str(tmp_path / name), "--model", str(mnist_export))
        assert code == 0, rows
        accuracy = np.mean([r["index"] == d for r, d in zip(rows, digits[:n].tolist())])
        assert accuracy >= 0.95, f"{name}: {accuracy:.0%}"


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def bad_corpus(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    """Files a real folder holds; value: expected error substring, or None when it must be predicted."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    digit, _ = synthetic_digits(1, seed=5)
    good = Image.fromarray(digit[0], mode="L")
    good.save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "good.png").read_bytes()
    big = io.BytesIO()
    good.resize((300, 300)).save(big, "PNG")
    (folder / "truncated.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "notes.png").write_text("this is not an image\n")
    Image.fromarray(digit[0].astype(np.uint16) * 257).save(folder / "deep16.png")
    good.convert("CMYK").save(folder / "cmyk.jpg")
    frames = [good, Image.new("L", (28, 28), 255)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    Image.new("L", (40, 40), 200).save(folder / "blank.png")
    (folder / "huge.png").write_bytes(png_header_only(30000, 30000))
    good.save(folder / "webp.webp")
    good.save(folder / "tiff.tiff")
    good.save(folder / "bmp.bmp")
    good.save(folder / "pgm.pgm")
    expected = {"good.png": None, "empty.png": "not an image", "truncated.png": "cannot decode",
                "random.jpg": "not an image", "notes.png": "not an image", "deep16.png": None,
                "cmyk.jpg": None, "animated.gif": None, "blank.png": "blank image", "huge.png": "too large",
                "webp.webp": None, "tiff.tiff": None, "bmp.bmp": None, "pgm.pgm": None}
    if os.geteuid() != 0:  # root reads anything, so permissions can only be tested as a normal user
        locked = folder / "locked.png"
        good.save(locked)
        locked.chmod(0)
        expected["locked.png"] = "permission denied"
    assert len(data) > 0
    return folder, expected


def test_bad_files_get_error_rows_and_good_files_are_predicted(exported_run: Path, bad_corpus, capsys) -> None:
    folder, expected = bad_corpus
    code, rows = predict_jsonl(capsys, str(folder), "--model", str(exported_run))
    assert code == 1
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == set(expected)
    for name, error in expected.items():
        row = by_name[name]
        if error is None:
            assert "error" not in row and row["class"] in [str(d) for d in range(10)], (name, row)
        else:
            assert error in row["error"], (name, row)
    same = {by_name[n]["index"] for n in ("good.png", "deep16.png", "animated.gif", "tiff.tiff", "bmp.bmp",
                                          "pgm.pgm", "cmyk.jpg")}
    assert len(same) == 1  # copies of one 28x28 digit pass through unchanged: one answer


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript"])
def test_model_in_workers_gives_the_rows_of_the_model_in_process(exported_run: Path, bad_corpus, tmp_path: Path,
                                                                  capsys, runtime: str) -> None:
    """--workers 3: each worker runs its own model copy; --workers 1: one model here. Small batches put
    good and bad files, and batches with no good file at all, in the same run."""
    folder, _ = bad_corpus
    images, _ = synthetic_digits(12, seed=6)
    save_pngs(folder / "more", images)
    common = [str(folder), str(folder / "more"), "--model", str(exported_run), "--runtime", runtime,
              "--batch-size", "3", "--top-k", "2"]
    runs = []
    for workers in ("1", "3"):
        code = main(["predict", *common, "--workers", workers, "--format", "jsonl"])
        out, err = capsys.readouterr()
        runs.append((code, [json.loads(line) for line in out.splitlines()], err))
    (code_here, here, err_here), (code_pool, pooled, err_pool) = runs
    assert code_here == code_pool == 1
    assert "workers" not in err_here and "3 workers" in err_pool  # where the model ran
    assert [r["path"] for r in here] == [r["path"] for r in pooled]
    assert [r.get("error") for r in here] == [r.get("error") for r in pooled]
    assert [r.get("class") for r in here] == [r.get("class") for r in pooled]
    assert np.allclose([r.get("confidence", 0) for r in here], [r.get("confidence", 0) for r in pooled], atol=1e-6)
    assert sum("error" not in r for r in pooled) >= 12 + 7


def test_unchanged_passthrough_for_mnist_shaped_images(tmp_path: Path) -> None:
    images, _ = synthetic_digits(3, seed=2)
    for path, img in zip(save_pngs(tmp_path, images), images):
        assert np.array_equal(load_digit(path), img.astype(np.float32) / 255.0)
    Image.fromarray(images[0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(load_digit(tmp_path / "deep.png"), images[0].astype(np.float32) / 255.0)


def test_preprocessing_centres_and_scales_ink(tmp_path: Path) -> None:
    img = np.full((100, 60), 255, np.uint8)
    img[10:50, 5:15] = 0  # a dark bar, off-centre, on white paper
    Image.fromarray(img, mode="L").save(tmp_path / "bar.png")
    digit = load_digit(tmp_path / "bar.png")
    rows, cols = np.nonzero(digit > 0.5)
    assert rows.max() - rows.min() + 1 == 20  # longest side scaled to 20 px
    ys, xs = np.indices(digit.shape)
    assert abs((ys * digit).sum() / digit.sum() + 0.5 - 14) < 1 and abs((xs * digit).sum() / digit.sum() + 0.5 - 14) < 1
    assert digit.max() == pytest.approx(1.0) and digit[0, 0] == 0.0  # inverted: bright ink on black


def test_runtimes_agree(exported_run: Path, tmp_path: Path, capsys) -> None:
    images, _ = synthetic_digits(50, seed=3)
    save_pngs(tmp_path, images)
    _, onnx_rows = predict_jsonl(capsys, str(tmp_path), "--model", str(exported_run))
    _, ts_rows = predict_jsonl(capsys, str(tmp_path), "--model", str(exported_run), "--runtime", "torchscript")
    assert [r["class"] for r in onnx_rows] == [r["class"] for r in ts_rows]
    assert np.allclose([r["confidence"] for r in onnx_rows], [r["confidence"] for r in ts_rows], atol=1e-5)


def test_formats_parse(exported_run: Path, tmp_path: Path, capsys) -> None:
    images, _ = synthetic_digits(5, seed=4)
    save_pngs(tmp_path / "in", images)
    (tmp_path / "in" / "bad.png").write_bytes(b"x")
    model = ["--model", str(exported_run), "--top-k", "3"]
    assert main(["predict", str(tmp_path / "in"), *model, "--format", "csv", "--output", str(tmp_path / "p.csv")]) == 1
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 6 and rows[-1]["path"].endswith("bad.png") and rows[-1]["error"]
    assert 0 < float(rows[0]["confidence"]) <= 1 and rows[0]["top1_class"] == rows[0]["class"]
    assert float(rows[0]["top1_confidence"]) >= float(rows[0]["top2_confidence"]) >= float(rows[0]["top3_confidence"])
    assert "top4_class" not in rows[0] and rows[-1]["top1_class"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp output replaced
    assert main(["predict", str(tmp_path / "in"), *model, "--format", "jsonl"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 6 and len(records[0]["top_k"]) == 3 and "error" in records[-1]
    assert records[0]["top_k"][0]["class"] == records[0]["class"]
    assert main(["predict", str(tmp_path / "in"), *model]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["class", "index", "conf", "path"] and len(lines) == 7
    assert "error" in lines[-1] and lines[1].split()[0] == records[0]["class"]
    assert "6 images, 1 failed" in captured.err


@pytest.mark.parametrize("case", ["no_such_path", "empty_folder", "missing_model", "tampered_model",
                                  "checkpoint_as_model", "unloadable_model", "unloadable_model_in_workers"])
def test_usage_errors_exit_2_with_one_line(case: str, exported_run: Path, tmp_path: Path, capsys) -> None:
    images, _ = synthetic_digits(2, seed=0)
    save_pngs(tmp_path / "imgs", images)
    (tmp_path / "empty").mkdir()
    inputs, model = str(tmp_path / "imgs"), str(exported_run)
    if case == "no_such_path":
        inputs = str(tmp_path / "nope")
    elif case == "empty_folder":
        inputs = str(tmp_path / "empty")
    elif case == "missing_model":
        model = str(tmp_path / "no_model")
    elif case == "tampered_model":
        model = str(tmp_path / "tampered")
        shutil.copytree(exported_run, tmp_path / "tampered")
        with open(tmp_path / "tampered" / "model.onnx", "ab") as f:
            f.write(b"\0")
    elif case == "checkpoint_as_model":
        model = str(exported_run.parent / "checkpoints" / "best.pt")
    elif case.startswith("unloadable_model"):  # sha256 and size match, but the file is no ONNX model
        model = str(tmp_path / "unloadable")
        shutil.copytree(exported_run, tmp_path / "unloadable")
        junk = b"not an onnx model" * 8
        (tmp_path / "unloadable" / "model.onnx").write_bytes(junk)
        manifest = json.loads((tmp_path / "unloadable" / "manifest.json").read_text())
        manifest["artifacts"]["onnx"].update(sha256=hashlib.sha256(junk).hexdigest(), bytes=len(junk))
        (tmp_path / "unloadable" / "manifest.json").write_text(json.dumps(seal(manifest)))
    workers = "2" if case.endswith("in_workers") else "1"
    assert main(["predict", inputs, "--model", model, "--workers", workers]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("serve_cli: error:"), err
    assert captured.out == ""
    expected = {"no_such_path": "no such file", "empty_folder": "no image files", "missing_model": "does not exist",
                "tampered_model": "does not match its sha256", "checkpoint_as_model": "python -m export",
                "unloadable_model": "cannot be loaded by onnxruntime",
                "unloadable_model_in_workers": "cannot be loaded by onnxruntime"}[case]
    assert expected in err[0]


def test_recursive_and_explicit_files(exported_run: Path, tmp_path: Path, capsys) -> None:
    images, _ = synthetic_digits(3, seed=0)
    save_pngs(tmp_path / "a" / "sub", images[:2])
    save_pngs(tmp_path / "b", images[2:])
    args = ["--model", str(exported_run)]
    code, rows = predict_jsonl(capsys, str(tmp_path / "a"), str(tmp_path / "b" / "00000.png"), *args)
    assert code == 0 and [Path(r["path"]).name for r in rows] == ["00000.png"]  # a/ holds only a sub-folder
    code, rows = predict_jsonl(capsys, str(tmp_path / "a"), str(tmp_path / "b" / "00000.png"), "-r", *args)
    assert code == 0 and [Path(r["path"]).relative_to(tmp_path).as_posix() for r in rows] == \
        ["a/sub/00000.png", "a/sub/00001.png", "b/00000.png"]


def test_info_describes_the_network_training_artifacts_and_parity(exported_run: Path, capsys) -> None:
    assert main(["info", str(exported_run)]) == 0
    out = capsys.readouterr().out
    assert "slimnet (dataset mnist, task digits, 10 classes: 0, 1, 2" in out and "parity     passed" in out and "sha256 ok" in out
    assert "training   slimnet, 2 epoch(s), 128 images per step, world size 2, seed 0" in out
    assert main(["info", str(exported_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["name"] == "slimnet"


def test_default_model_is_newest_export_under_runs(exported_run: Path, tmp_path: Path) -> None:
    for name, age in (("binary", 100), ("digits", 50), ("older", 200)):  # digits is the newest
        shutil.copytree(exported_run, tmp_path / "runs" / name / "export")
        manifest = tmp_path / "runs" / name / "export" / "manifest.json"
        os.utime(manifest, (time.time() - age, time.time() - age))
    images, _ = synthetic_digits(2, seed=0)
    save_pngs(tmp_path / "imgs", images)
    env = {k: v for k, v in os.environ.items() if k != "SERVE_CLI_MODEL"}
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", "imgs"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model runs/digits/export]" in proc.stderr and len(proc.stdout.splitlines()) == 3


def test_serve_cli_model_variable_wins(exported_run: Path, tmp_path: Path) -> None:
    (tmp_path / "runs" / "digits").mkdir(parents=True)  # an export under runs/ that must not be chosen
    shutil.copytree(exported_run, tmp_path / "runs" / "digits" / "export")
    shutil.copytree(exported_run, tmp_path / "chosen")
    save_pngs(tmp_path / "imgs", synthetic_digits(2, seed=0)[0])
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", "imgs"], cwd=tmp_path,
                          env={**os.environ, "SERVE_CLI_MODEL": "chosen"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model chosen]" in proc.stderr


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript"])
def test_threads_per_model_copy(exported_run: Path, tmp_path: Path, runtime: str, capsys) -> None:
    paths = save_pngs(tmp_path, synthetic_digits(12, seed=2)[0])
    rows = {}
    for threads in ("1", "2"):
        assert main(["predict", str(tmp_path), "--model", str(exported_run), "--threads", threads,
                     "--workers", "1", "--runtime", runtime, "--format", "csv"]) == 0
        rows[threads] = capsys.readouterr().out
    assert rows["1"] == rows["2"] and len(rows["1"].splitlines()) == len(paths) + 1


@pytest.mark.parametrize("workers", ["1", "2"])
def test_onnx_path_imports_no_torch(exported_run: Path, tmp_path: Path, workers: str) -> None:
    """-X importtime logs every import in every process, the forked workers that run the model included."""
    images, _ = synthetic_digits(4, seed=0)
    save_pngs(tmp_path, images)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "serve_cli", "predict", str(tmp_path),
                           "--model", str(exported_run), "--workers", workers],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "onnxruntime" in imported  # the log covers the model's process
    assert not {"torch", "torchvision"} & imported


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = np.full((60, 40), 255, np.uint8)
    img[5:40, 5:12] = 0  # a dark "L": a 180-degree turn changes it, unlike a bar
    img[33:40, 5:30] = 0
    upright = Image.fromarray(img, mode="L")
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180" when displayed
    upright.rotate(180).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    a, b = load_digit(tmp_path / "upright.png"), load_digit(tmp_path / "rotated.jpg")
    assert np.abs(a - b).mean() < 0.02  # same digit once the orientation tag is honoured
    assert np.abs(a - np.rot90(b, 2)).mean() > 0.05  # and the test could tell them apart
