"""A hostile but realistic user: bad flags, bad files, tampered artifacts, odd folders, full disks, signals.

Each case asserts the exit code, one line of error without a traceback, and that no user file changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, resave, synthetic_digits, write_synthetic_mnist
from distributed import checkpoint
from distributed.train import main as train
from export.__main__ import main as export
from serve_cli.base.manifest import seal
from serve_cli.__main__ import main as serve

pytestmark = pytest.mark.slow


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, by relative path (but the run-dir lock, which names the
    last trainer that held it)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def one_error_line(err: str, *needles: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run(*cmd: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "1",
            "--model", "mlp", "--device", "cpu", *extra]


def pngs(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = synthetic_digits(n, seed=3)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


# -- export: never destroy what we did not write --------------------------------------------------------

def test_export_refuses_a_folder_with_someone_elses_manifest(exported_run: Path, tmp_path: Path, capsys) -> None:
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (app / "index.html").write_text("<html></html>")
    before = snapshot(app)
    assert export(["--checkpoint", str(exported_run.parent / "checkpoints" / "best.pt"), "--out-dir", str(app)]) == 1
    one_error_line(capsys.readouterr().err, "not an export of this tool")
    assert snapshot(app) == before


def test_reexport_keeps_the_users_other_files(exported_run: Path, tmp_path: Path, capsys) -> None:
    out = Path(shutil.copytree(exported_run, tmp_path / "export"))
    (out / "README.txt").write_text("my notes")
    (out / "model.onnx.bak").write_bytes(b"my backup")
    old_manifest = json.loads((out / "manifest.json").read_text())
    assert export(["--checkpoint", str(exported_run.parent / "checkpoints" / "best.pt"), "--out-dir", str(out),
                   "--batch-sizes", "1,64"]) == 0
    assert (out / "README.txt").read_text() == "my notes" and (out / "model.onnx.bak").read_bytes() == b"my backup"
    new_manifest = json.loads((out / "manifest.json").read_text())
    assert new_manifest["digest"] != old_manifest["digest"]  # really re-exported (a new "created" time)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.txt", "model.onnx.bak", "manifest.json", "model.onnx", "model.ts", "model.pt2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging dir left


def test_export_to_a_file_is_refused(exported_run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    assert export(["--checkpoint", str(exported_run.parent / "checkpoints" / "best.pt"), "--out-dir", str(target)]) == 1
    one_error_line(capsys.readouterr().err, "is a file")
    assert target.read_text() == "keep"


def test_nan_model_fails_the_gate(exported_run: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(exported_run.parent / "checkpoints" / "best.pt", weights_only=True)
    first = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][first] = torch.full_like(state["model"][first], float("nan"))
    resave(tmp_path / "nan.pt", state)
    assert export(["--checkpoint", str(tmp_path / "nan.pt"), "--out-dir", str(tmp_path / "e"),
                   "--batch-sizes", "1,64"]) == 1
    one_error_line(capsys.readouterr().err, "parity gate failed", "NaN or infinite logits")
    assert not (tmp_path / "e").exists()


def test_export_on_a_full_disk_changes_nothing(exported_run: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(exported_run, tmp_path / "export"))
    before = snapshot(out)

    def small_disk() -> None:  # writes past 200 kB fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = run("-m", "export", "--checkpoint", str(exported_run.parent / "checkpoints" / "best.pt"),
               "--out-dir", str(out), preexec_fn=small_disk)
    assert proc.returncode == 1
    one_error_line(proc.stderr, "nothing was exported or changed")
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# -- the manifest is verified, not trusted -----------------------------------------------------------------

def edit_manifest(exported: Path, dest: Path, edit, reseal: bool) -> Path:
    out = Path(shutil.copytree(exported, dest))
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(seal(manifest) if reseal else manifest))
    return out


@pytest.mark.parametrize("case", ["rename_classes", "drop_a_class", "file_outside", "absolute_file"])
def test_edited_manifest_is_refused(exported_run: Path, tmp_path: Path, capsys, case: str) -> None:
    edits = {"rename_classes": lambda m: m["model"].update(classes=list("ABCDEFGHIJ")),
             "drop_a_class": lambda m: m["model"].update(classes=m["model"]["classes"][:9], num_classes=9),
             "file_outside": lambda m: m["artifacts"]["onnx"].update(file="../model.onnx"),
             "absolute_file": lambda m: m["artifacts"]["onnx"].update(file=str(exported_run / "model.onnx"))}
    out = edit_manifest(exported_run, tmp_path / "e", edits[case], reseal=False)
    assert export(["--verify", str(out)]) == 1
    one_error_line(capsys.readouterr().err, "was changed after export")
    assert serve(["predict", str(pngs(tmp_path / "imgs")), "--model", str(out)]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "was changed after export")
    assert captured.out == ""


def test_resealed_manifest_with_fewer_classes_than_outputs_is_refused(exported_run: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """A tamperer who re-computes the digest and keeps the manifest self-consistent: the model's own answers
    on the probe images (10 logits, not 9) give it away at load."""
    def nine(m: dict) -> None:
        m["model"].update(classes=m["model"]["classes"][:9], num_classes=9)
        m["output"]["shape"] = ["N", 9]
        m["reference"]["logits"] = [row[:9] for row in m["reference"]["logits"]]
    out = edit_manifest(exported_run, tmp_path / "e", nine, reseal=True)
    assert serve(["predict", str(pngs(tmp_path / "imgs")), "--model", str(out), "--workers", "1"]) == 2
    one_error_line(capsys.readouterr().err, "answers 10 classes, but the manifest lists 9")


def test_resealed_manifest_with_a_file_outside_is_refused(exported_run: Path, tmp_path: Path, capsys) -> None:
    out = edit_manifest(exported_run, tmp_path / "e", lambda m: m["artifacts"]["onnx"].update(file="../x.onnx"),
                        reseal=True)
    assert serve(["info", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "not a file inside the export dir")


def test_verify_with_an_unloadable_artifact_is_one_line(exported_run: Path, tmp_path: Path, capsys) -> None:
    junk = b"not a torchscript archive" * 4
    def swap(m: dict) -> None:
        m["artifacts"]["torchscript"].update(sha256=hashlib.sha256(junk).hexdigest(), bytes=len(junk))
    out = edit_manifest(exported_run, tmp_path / "e", swap, reseal=True)
    (out / "model.ts").write_bytes(junk)
    assert export(["--verify", str(out)]) == 1
    one_error_line(capsys.readouterr().err, "cannot be loaded")


# -- serve_cli: the output never overwrites an input; odd folder entries are rows ------------------------

def test_output_that_is_an_input_is_refused(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs")
    before = snapshot(folder)
    for output, inputs in ((folder / "000.png", [str(folder / "000.png")]), (folder / "001.png", [str(folder)])):
        assert serve(["predict", *inputs, "--model", str(exported_run), "--output", str(output)]) == 2
        one_error_line(capsys.readouterr().err, "is one of the input images")
    assert snapshot(folder) == before


@pytest.mark.parametrize("case", ["folder", "missing_parent", "unwritable_place"])
def test_unwritable_output_fails_before_any_work(exported_run: Path, tmp_path: Path, capsys, case: str) -> None:
    folder = pngs(tmp_path / "imgs")
    output = {"folder": tmp_path, "missing_parent": tmp_path / "nope" / "out.csv",
              "unwritable_place": Path("/proc/out.csv")}[case]  # /proc takes no new files, even from root
    start = time.perf_counter()
    assert serve(["predict", str(folder), "--model", str(exported_run), "--output", str(output)]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "--output")
    assert captured.out == "" and time.perf_counter() - start < 5


def test_odd_folder_entries_become_error_rows(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    os.mkfifo(folder / "pipe.png")  # opening it would block forever
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "up").symlink_to(folder)  # a directory cycle under -r
    Image.fromarray(synthetic_digits(1, 5)[0][0]).save(folder / "sub" / "deep.png")
    proc = run("-m", "serve_cli", "predict", str(folder), "-r", "--model", str(exported_run), "--format", "jsonl",
               timeout=60)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in by_name["pipe.png"]["error"]
    assert "no such file" in by_name["dangling.png"]["error"]
    assert "cannot read" in by_name["loop.png"]["error"]
    assert sorted(by_name) == ["000.png", "001.png", "002.png", "dangling.png", "deep.png", "loop.png", "pipe.png"]
    assert len(rows) == 7  # the cycle was walked once


def test_non_utf8_file_names_are_printed(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 1)
    os.rename(folder / "000.png", os.fsencode(folder) + b"/caf\xe9.png")
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run)],
                          cwd=ROOT, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"caf\xe9.png" in proc.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_serve_cli_and_leaves_no_partial_file(exported_run: Path, tmp_path: Path,
                                                            signum: int) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    image = synthetic_digits(1, 0)[0][0]
    Image.fromarray(image).save(folder / "00000.png")
    for i in range(1, 4000):
        os.link(folder / "00000.png", folder / f"{i:05d}.png")
    out = tmp_path / "out" / "rows.csv"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run),
                             "--output", str(out), "--batch-size", "8", "--workers", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.stat().st_size for p in out.parent.glob(".rows.csv.*.partial")):  # rows are being written
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signum
    one_error_line(err, "interrupted")
    assert list(out.parent.iterdir()) == []


# -- the trainer ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--lr", "-1"], ["--momentum", "-0.5"],
                                   ["--label-smoothing", "1"], ["--epochs", "0"], ["--val-size", "-3"],
                                   ["--weight-decay", "inf"], ["--batch-size", "two"]])
def test_nonsense_flags_are_usage_errors(flags: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        train(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and "Traceback" not in err


def test_run_dir_that_is_a_file(synthetic_data, tmp_path: Path, capsys) -> None:
    (tmp_path / "f").write_text("keep")
    assert train(train_args(synthetic_data, tmp_path / "f")) == 1
    one_error_line(capsys.readouterr().err, "is a file, not a folder")
    assert (tmp_path / "f").read_text() == "keep"


def test_second_trainer_on_the_same_run_dir_is_refused(synthetic_data, tmp_path: Path, capsys) -> None:
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from distributed.run_dir import RunDirLock; "
                               f"lock = RunDirLock(Path({str(tmp_path)!r})); lock.acquire(); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(train_args(synthetic_data, tmp_path)) == 1
        one_error_line(capsys.readouterr().err, "is in use by pid", str(holder.pid))
        assert not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(train_args(synthetic_data, tmp_path)) == 0  # the dead holder's lock is gone with it


@pytest.mark.parametrize("flags, named", [(["--seed", "1"], "--seed 0 -> 1"), (["--val-size", "0"], "--val-size 64 -> 0"),
                                          (["--model", "samnet"], "--model mlp -> samnet")])
def test_resume_refuses_another_experiment(synthetic_data, tmp_path: Path, capsys, flags, named: str) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert train(train_args(synthetic_data, tmp_path, *flags, "--epochs", "2")) == 1
    one_error_line(capsys.readouterr().err, named, "--no-resume")
    assert snapshot(tmp_path) == before


def test_checkpoint_of_another_network_is_one_line(synthetic_data, tmp_path: Path, capsys) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    last = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"] = {"0.weight": torch.zeros(3, 3)}
    resave(last, state)
    capsys.readouterr()
    assert train(train_args(synthetic_data, tmp_path, "--epochs", "2")) == 1
    one_error_line(capsys.readouterr().err, "does not fit this run")


def test_diverging_loss_stops_with_a_clear_error(synthetic_data, tmp_path: Path, capsys) -> None:
    assert train(train_args(synthetic_data, tmp_path, "--optimizer", "sgd", "--lr", "1e6", "--schedule", "none")) == 1
    one_error_line(capsys.readouterr().err, "became NaN or infinite")
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing non-finite was saved
    assert not (tmp_path / "metrics.json").exists()


def test_full_disk_during_checkpoint_keeps_the_previous_one(synthetic_data, tmp_path: Path) -> None:
    assert train(train_args(synthetic_data, tmp_path)) == 0
    before = snapshot(tmp_path / "checkpoints")

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = run("-m", "distributed.train", *train_args(synthetic_data, tmp_path, "--model", "fastnet", "--no-resume"),
               preexec_fn=small_disk)
    assert proc.returncode == 1
    one_error_line(proc.stderr, "cannot write", "the previous last.pt is kept")
    assert snapshot(tmp_path / "checkpoints") == before


@pytest.mark.parametrize("damage, needle", [("truncate", "is damaged"), ("header", "bad header"),
                                            ("labels", "labels outside 0-9")])
def test_damaged_extracted_mnist_is_named(tmp_path: Path, capsys, damage: str, needle: str) -> None:
    data = write_synthetic_mnist(tmp_path / "data", n_train=200, n_test=50)
    raw = data / "MNIST" / "raw"
    if damage == "truncate":
        path = raw / "train-images-idx3-ubyte"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "header":
        path = raw / "t10k-images-idx3-ubyte"
        path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])
    else:
        path = raw / "train-labels-idx1-ubyte"
        content = bytearray(path.read_bytes())
        content[20] = 42
        path.write_bytes(bytes(content))
    assert train(["--data-dir", str(data), "--run-dir", str(tmp_path / "r"), "--val-size", "10", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, str(path.name), needle)


def test_metrics_count_the_work_of_a_stopped_and_resumed_run(synthetic_data, tmp_path: Path) -> None:
    from distributed import comms
    from distributed.config import parse_args
    from distributed.train import Preempted, StopRequest, run
    cfg = parse_args(train_args(synthetic_data, tmp_path, "--batch-size", "16"))
    with pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"), stop=StopRequest(signal=15))  # stops at step 10 of 36
    stopped = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]
    assert stopped["train_images"] == 10 * 16 and stopped["train_seconds"] > 0
    assert train(train_args(synthetic_data, tmp_path, "--batch-size", "16")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_images"] == 576  # 10 batches before the stop + 26 after, each image once
    assert metrics["train_seconds"] > stopped["train_seconds"]
    whole = metrics["history"][0]
    assert whole["step"] == 36 and np.isfinite(whole["train_loss"]) and whole["train_loss"] > 0


def test_compile_without_a_compiler_is_one_line(synthetic_data: Path, tmp_path: Path) -> None:
    # inductor needs a C++ compiler on the CPU: a machine without one gets the fix, not dynamo's traceback
    proc = run("-m", "distributed.train", *train_args(synthetic_data, tmp_path / "run"), "--overfit-batches", "1",
               "--compile", timeout=300,
               env={**os.environ, "CXX": str(tmp_path / "no-such-g++")})
    assert proc.returncode == 1
    one_error_line(proc.stderr, "--compile failed", "run without --compile")
