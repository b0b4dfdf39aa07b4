"""Reliability, round 2: outputs that are not plain files, checkpoints that lie, folders that change, signals.

Each case checks the exit code, one error line without a traceback, and that no user file changed.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT, resave
from serve_cli.__main__ import main as serve
from test_hostile import one_error_line, pngs, snapshot

pytestmark = pytest.mark.slow


# -- 1. serve_cli --output: a device, FIFO or link is written through, never replaced -----------------------

def predict(model: Path, folder: Path, output: Path | str, *extra: str) -> list[str]:
    return ["predict", str(folder), "--model", str(model), "--format", "csv", "--output", str(output), *extra]


def device_node(path: Path, minor: int) -> Path:
    """A private copy of a memory device (3: null, 7: full), so that broken code replaces it, not /dev's."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def test_output_link_stays_a_link_and_its_target_gets_the_rows(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "rows.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "rows.csv"
    link.symlink_to(target)
    assert serve(predict(exported_run, folder, link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    lines = target.read_text().splitlines()
    assert lines[0].startswith("path,") and len(lines) == 4
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the user's file keeps its permissions
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "real", "rows.csv"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rows.csv"]


def test_output_fifo_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)  # never blocks exit
    reader.start()
    assert serve(predict(exported_run, folder, fifo)) == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(received) == 1 and len(received[0].splitlines()) == 4


def test_output_device_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    null = device_node(tmp_path / "null", 3)
    assert serve(predict(exported_run, folder, null)) == 0
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "null"]


def test_full_device_is_an_error(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    full = device_node(tmp_path / "full", 7)
    assert serve(predict(exported_run, folder, full)) == 1
    one_error_line(capsys.readouterr().err, "--output", "No space left")
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_to_dev_fd_reaches_the_shells_redirect(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    redirect = tmp_path / "stdout.txt"
    with open(redirect, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, folder, "/dev/fd/1")],
                              cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(redirect.read_text().splitlines()) == 4


def test_interrupted_run_keeps_the_previous_regular_output(exported_run: Path, tmp_path: Path) -> None:
    """Regular files are still replaced atomically: a run that fails half-way leaves the old rows whole."""
    folder = pngs(tmp_path / "imgs", 3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "rows.csv"
    out.write_text("old rows\n")
    inode = out.stat().st_ino
    assert serve(predict(exported_run, folder, out)) == 1  # one error row: the run completes, file replaced
    assert out.stat().st_ino != inode and len(out.read_text().splitlines()) == 5
    out.write_text("old rows\n")
    read_only = tmp_path / "ro.csv"
    read_only.write_text("keep\n")
    read_only.chmod(0o444)
    if os.access(read_only, os.W_OK):
        return  # root may write anything: the refusal below is for ordinary users
    assert serve(predict(exported_run, folder, read_only)) == 2
    assert read_only.read_text() == "keep\n"


# -- 2. a checkpoint carries the digest of what it holds; export compares the recorded accuracy -------------

def flip_weight_bytes(path: Path, count: int = 400) -> None:
    """Flip `count` bytes in the largest tensor record of a torch.save zip file, leaving the zip readable."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    for i in range(start, start + min(count, info.file_size)):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_refused_by_export_and_resume(ddp_run: Path, synthetic_data: Path,
                                                                       tmp_path: Path, capsys) -> None:
    import shutil
    from distributed.train import main as train
    from export.__main__ import main as export
    run_dir = Path(shutil.copytree(ddp_run, tmp_path / "run", ignore=shutil.ignore_patterns("export", ".lock")))
    for name in ("best.pt", "last.pt"):
        flip_weight_bytes(run_dir / "checkpoints" / name)
    before = snapshot(run_dir)
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,64"]) == 1
    one_error_line(capsys.readouterr().err, "best.pt is damaged")
    assert train(["--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "3",
                  "--eval-batch-size", "48", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, "last.pt is damaged")
    assert snapshot(run_dir) == before and not (run_dir / "export").exists()


def test_weights_that_do_not_score_the_recorded_accuracy_are_not_exported(ddp_run: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """A checkpoint whose digest is right but whose weights are not what was scored (damaged before they were
    written): the eager model on the same test split tells."""
    from distributed import checkpoint
    from export.__main__ import main as export
    state = checkpoint.load(ddp_run / "checkpoints" / "best.pt")
    last_weight = [k for k in state["model"] if k.endswith("weight")][-1]
    state["model"][last_weight] = state["model"][last_weight].flip(0)  # classes' rows swapped: wrong answers
    damaged = tmp_path / "damaged.pt"
    resave(damaged, state)
    assert export(["--checkpoint", str(damaged), "--out-dir", str(tmp_path / "out"), "--batch-sizes", "1,64"]) == 1
    one_error_line(capsys.readouterr().err, "records test accuracy", "same 200 test images")
    assert not (tmp_path / "out").exists()


def test_a_healthy_checkpoint_exports_on_its_own_test_set(exported_run: Path) -> None:
    """Passes with or without the checks above: they must not refuse a good run."""
    import json
    parity = json.loads((exported_run / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["training_test_set"] is True
    from distributed import checkpoint
    recorded = checkpoint.load(exported_run.parent / "checkpoints" / "best.pt")["metrics"]["test_accuracy"]
    assert parity["runtimes"]["eager"]["accuracy"] == pytest.approx(recorded, abs=1e-9)


# -- 3. a folder dataset that changed under a resume -----------------------------------------------------

def digit_folder(root: Path, per_class: int = 30) -> Path:
    """Two classes of synthetic digit PNGs (zero and one)."""
    from PIL import Image
    from conftest import synthetic_digits
    images, labels = synthetic_digits(per_class * 10, seed=7)
    for i, (img, label) in enumerate(zip(images, labels)):
        if label < 2:
            (root / ("zero", "one")[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / ("zero", "one")[label] / f"{i:04d}.png")
    return root


def folder_args(folder: Path, run_dir: Path, epochs: int) -> list[str]:
    return ["--dataset", f"folder:{folder}", "--run-dir", str(run_dir), "--val-size", "5", "--epochs", str(epochs),
            "--model", "mlp", "--batch-size", "16", "--device", "cpu"]


@pytest.mark.parametrize("change", ["added", "removed", "replaced"])
def test_resume_on_a_changed_folder_is_refused(tmp_path: Path, capsys, change: str) -> None:
    from PIL import Image
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    capsys.readouterr()
    zero = sorted((folder / "zero").iterdir())
    if change == "added":
        Image.open(zero[0]).save(folder / "zero" / "extra.png")
        Image.open(zero[1]).save(folder / "zero" / "extra2.png")
    elif change == "removed":
        zero[0].unlink()
    else:  # the same count, other pictures
        for path in zero:
            Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path)
    before = snapshot(run_dir)
    assert train(folder_args(folder, run_dir, 2)) == 1
    line = one_error_line(capsys.readouterr().err, "was trained on other data", "--no-resume")
    if change != "replaced":
        assert "class 'zero'" in line
    assert snapshot(run_dir) == before
    assert train(folder_args(folder, run_dir, 2) + ["--no-resume"]) == 0


# -- 6. export after a folder dataset moved ------------------------------------------------------------

def test_export_after_the_folder_moved_names_what_the_gate_needs(tmp_path: Path, capsys) -> None:
    import json
    from distributed.train import main as train
    from export.__main__ import main as export
    folder = digit_folder(tmp_path / "digits")
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    moved = tmp_path / "elsewhere"
    (folder / "zero").rename(tmp_path / "zero-moved")  # class folders moved away: the cache stays behind
    capsys.readouterr()
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,16"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out and "--dataset" not in out
    assert f"image folder {folder.resolve()} is not usable" in out and "--data-dir FOLDER" in out
    folder.rename(moved)
    (tmp_path / "zero-moved").rename(moved / "zero")
    assert export(["--run-dir", str(run_dir), "--batch-sizes", "1,16", "--data-dir", str(moved)]) == 0
    parity = json.loads((run_dir / "export" / "manifest.json").read_text())["parity"]
    assert parity["dataset"].startswith(f"the test split of {moved}") and parity["training_test_set"]


@pytest.mark.parametrize("name", ["binary", "digits"])
def test_a_folder_named_like_an_mnist_task_learns_its_own_classes(tmp_path: Path, name: str) -> None:
    """Issue 20's name collision: folder:/data/binary was MNIST's binary task with every class mapped to 0."""
    from distributed.config import parse_args
    from distributed.data import task_of
    folder = digit_folder(tmp_path / name, per_class=3)
    cfg = parse_args(["--dataset", f"folder:{folder}"])
    task = task_of(cfg.dataset, cfg.task)
    assert task.classes == ("one", "zero") and task.map_labels(torch.tensor([0, 1])).tolist() == [0, 1]


# -- 4. BatchNorm and a batch of one image ----------------------------------------------------------------

def test_batchnorm_model_refuses_batch_size_one(capsys) -> None:
    from distributed.config import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--model", "recordnet", "--batch-size", "1", "--device", "cpu"])
    assert e.value.code == 2 and "BatchNorm" in capsys.readouterr().err
    assert parse_args(["--model", "mlp", "--batch-size", "1", "--device", "cpu"]).batch_size == 1


@pytest.mark.parametrize("images,steps,trained", [(129, 1, 128), (131, 2, 131)])
def test_batchnorm_model_never_trains_on_one_image_at_two_ranks(synthetic_data: Path, tmp_path: Path, images: int,
                                                                 steps: int, trained: int) -> None:
    """Global batch 128 at 2 ranks. 129 images: the last step would be one image, left out. 131: the last step's
    3 images cannot give each rank two, so rank 0 takes them and rank 1 makes an idle pass (the same
    forwards and backwards on both ranks, or DDP would hang)."""
    import json
    from conftest import torchrun
    run_dir = tmp_path / "run"
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--model",
                                   "recordnet", "--val-size", str(640 - images), "--epochs", "1", "--device", "cpu"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("recordnet has BatchNorm" in proc.stdout and "(1 of 129 images)" in proc.stdout) == (images == 129)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == steps and metrics["train_images"] == trained
    assert len(set(metrics["replica_weight_sha256"])) == 1


# -- 5. a signal in every phase: one line, 128 + signal, nothing half-written --------------------------------

def big_digit_folder(root: Path, per_class: int) -> Path:
    """Large pictures (hard links of two files) that take a while to decode."""
    from PIL import Image
    from conftest import synthetic_digits
    for c, name in enumerate(("zero", "one")):
        (root / name).mkdir(parents=True)
        first = root / name / "00000.png"
        Image.fromarray(synthetic_digits(1, c)[0][0]).resize((600, 600)).save(first)
        for i in range(1, per_class):
            os.link(first, root / name / f"{i:05d}.png")
    return root


def decode_workers(root: int) -> bool:
    """Whether a spawned decoding process runs below process `root` (torchrun starts its workers in sessions
    of their own)."""
    parents, commands = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat_file.parent.name)] = int(stat_file.read_text().rsplit(")", 1)[1].split()[1])
            commands[int(stat_file.parent.name)] = (stat_file.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == root:
                return True
        return False
    return any(b"multiprocessing.spawn" in cmd and below(pid) for pid, cmd in commands.items())


@pytest.mark.parametrize("launcher,signum", [("python", signal.SIGTERM), ("torchrun", signal.SIGINT)])
def test_a_signal_while_a_folder_is_decoded_is_one_line(tmp_path: Path, launcher: str, signum: int) -> None:
    import time
    from conftest import torchrun
    folder = big_digit_folder(tmp_path / "pics", 1500)
    before = snapshot(folder)
    args = folder_args(folder, tmp_path / "run", 1)
    cmd = torchrun(2, *args) if launcher == "torchrun" else [sys.executable, "-m", "distributed.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not decode_workers(proc.pid):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    if launcher == "torchrun":
        os.killpg(proc.pid, signum)  # Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(signum)  # kill PID: the trainer alone
    out, err = proc.communicate(timeout=60)
    # torchrun prints its own SignalException traceback; none may come from a worker or its decoding pool
    ours = [f"distributed/{name}.py" for name in ("train", "folder", "data")]
    assert "KeyboardInterrupt" not in err and "BrokenProcessPool" not in err and not any(o in err for o in ours), err
    assert launcher == "torchrun" or "Traceback" not in err, err
    stops = [line for line in err.splitlines() if "stopped by signal" in line]
    assert stops == [f"stopped by signal {signum} before training began; nothing new was saved: run the "
                     f"same command again to start"], err
    if launcher == "python":
        assert proc.returncode == 128 + signum
    else:
        assert proc.returncode != 0
    assert snapshot(folder) == before  # no cache, no temp file
    assert not decode_workers(proc.pid)


def test_a_signal_during_the_last_evaluation_stops_with_the_epochs_checkpoint(synthetic_data: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    from distributed import checkpoint, comms
    from distributed.config import parse_args
    from distributed.train import Preempted, StopRequest, Trainer, run
    stop = StopRequest()
    score_all = Trainer.score_all

    def signalled(self, **kwargs):  # SIGTERM arrives while the test set is scored
        stop(signal.SIGTERM, None)
        return score_all(self, **kwargs)
    monkeypatch.setattr(Trainer, "score_all", signalled)
    cfg = parse_args(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--val-size", "64",
                      "--epochs", "1", "--model", "mlp", "--device", "cpu"])
    with pytest.raises(Preempted, match="stopped by signal 15 at epoch 1"):
        run(cfg, comms.setup("cpu"), stop=stop)
    run = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]
    assert run["epoch"] == 1 and run["step_in_epoch"] == 0 and not (tmp_path / "metrics.json").exists()


def test_a_signal_during_the_parity_gate_leaves_nothing(ddp_run: Path, tmp_path: Path) -> None:
    import time
    out_dir = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-m", "export", "--run-dir", str(ddp_run), "--out-dir", str(out_dir),
                             "--batch-sizes", "1,2,3"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".export.staging-*/model.onnx")):  # the artifacts are written: the gate is next
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    one_error_line(err, "stopped by signal 15", "nothing was exported")
    assert list(tmp_path.iterdir()) == []


# -- 7. links and pipes in a class folder are skipped, counted and named -------------------------------------

def test_odd_entries_in_a_class_folder_are_skipped_and_named(tmp_path: Path, capsys) -> None:
    import json
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "pics")
    zero = folder / "zero"
    (zero / "a.png").symlink_to(zero / "a.png")
    (zero / "gone.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(zero / "pipe.png")
    (zero / "dir.png").mkdir()  # a folder with an image's name: not an image, not listed
    run_dir = tmp_path / "run"
    assert train(folder_args(folder, run_dir, 1)) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "skipped" in line)
    assert "skipped 3 file(s)" in line
    assert "zero/a.png (cannot read (Too many levels of symbolic links))" in line
    assert "zero/gone.png (no such file (or a link to nothing))" in line
    assert "zero/pipe.png (not a regular file" in line
    assert json.loads((run_dir / "metrics.json").read_text())["test_accuracy"] >= 0


# -- 8. TensorBoard artifacts stay bounded however many classes ----------------------------------------------

def test_three_hundred_classes_keep_every_tensorboard_artifact_bounded(tmp_path: Path) -> None:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from conftest import synthetic_digits
    from distributed.report import CURVE_CLASSES, MATRIX_CLASSES
    from distributed.train import main as train
    images, _ = synthetic_digits(600, seed=2)
    root = tmp_path / "many"
    for c in range(300):
        for part, pictures in (("train", images[2 * c:2 * c + 2]), ("test", images[2 * c:2 * c + 1])):
            (root / part / f"c{c:03d}").mkdir(parents=True)
            for i, img in enumerate(pictures):
                Image.fromarray(img).save(root / part / f"c{c:03d}" / f"{i}.png")
    run_dir = tmp_path / "run"
    assert train(["--dataset", f"folder:{root}", "--run-dir", str(run_dir), "--val-size", "0", "--epochs", "1",
                  "--model", "mlp", "--device", "cpu"]) == 0
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    matrix = acc.Images("test/confusion_matrix")[-1]
    assert matrix.width <= 56 + 44 * MATRIX_CLASSES and matrix.height <= 56 + 44 * MATRIX_CLASSES
    recall = [t for t in acc.Tags()["scalars"] if t.startswith("test_per_class/recall/")]
    assert len(recall) == CURVE_CLASSES
    assert len([t for t in acc.Tags()["tensors"] if t.startswith("pr/")]) == CURVE_CLASSES


# -- 9. folder layouts: used by a documented rule, or refused in one line -------------------------------------

@pytest.mark.parametrize("layout,needle", [
    ("empty_class", "class folder(s) two hold no image files"),
    ("different_classes", "train/ and test/ hold different classes (only in train/: one; only in test/: none)"),
    ("beside", "has train/ and test/ and also extra/ beside them"),
    ("no_training_image", "class(es) one have no usable training images"),
])
def test_folder_layouts_that_cannot_train_are_refused(tmp_path: Path, capsys, layout: str, needle: str) -> None:
    from distributed.train import main as train
    if layout == "empty_class":
        folder = digit_folder(tmp_path / "pics")
        (folder / "two").mkdir()
    else:
        folder = tmp_path / "pics"
        digit_folder(folder / "train")
        digit_folder(folder / "test")
        if layout == "different_classes":
            for path in (folder / "test" / "one").iterdir():
                path.unlink()
            (folder / "test" / "one").rmdir()
        elif layout == "beside":
            digit_folder(folder / "extra" / "x", per_class=2)
        else:
            for path in (folder / "train" / "one").iterdir():
                path.write_bytes(b"not a picture")
    before = snapshot(folder)
    assert train(folder_args(folder, tmp_path / "run", 1)) == 1
    one_error_line(capsys.readouterr().err, needle)
    assert snapshot(folder) == before


def test_nested_folders_in_a_class_folder_are_named(tmp_path: Path, capsys) -> None:
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "pics")
    digit_folder(folder / "zero" / "more", per_class=2)
    assert train(folder_args(folder, tmp_path / "run", 1)) == 0
    out = capsys.readouterr().out
    assert "not read: 1 sub-folder(s) inside class folders (zero/more)" in out


# -- 10. messages that say what happened --------------------------------------------------------------------

def test_cache_messages_say_what_happened(tmp_path: Path, monkeypatch) -> None:
    import distributed.folder as folder_module
    from distributed.folder import CACHE_NAME, load_folder
    folder = digit_folder(tmp_path / "pics", per_class=5)
    cache = folder / CACHE_NAME

    def read_only(path, write):
        raise PermissionError(30, "Read-only file system", str(path))
    with monkeypatch.context() as m:
        m.setattr(folder_module, "atomic_write", read_only)
        data = load_folder(folder)
    assert not cache.exists() and data.cache_note.startswith(f"decoded; not cached: cannot write {cache.resolve()}")
    assert load_folder(folder).cache_note == "decoded and cached" and load_folder(folder).from_cache
    cache.write_bytes(cache.read_bytes()[:300])  # ours, damaged: repaired
    assert load_folder(folder).cache_note == "decoded and cached"
    assert load_folder(folder).cache_note == "from its cache"
    cache.write_bytes(b"the user's own file")  # not ours: never replaced, and said so
    assert "is a file this tool did not write" in load_folder(folder).cache_note
    assert cache.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("cmd", [["-m", "distributed.train", "--run-dir", ""],
                                 ["-m", "distributed.train", "--data-dir", " "],
                                 ["-m", "export", "--run-dir", ""],
                                 ["-m", "export", "--checkpoint", "x.pt", "--out-dir", ""]])
def test_an_empty_path_is_a_usage_error(cmd: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "an empty path" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_huge_image_is_an_error_row_without_pillows_warning(exported_run: Path, tmp_path: Path) -> None:
    from PIL import Image
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("1", (10000, 9000)).save(folder / "huge.png")  # 90 M pixels: just over Pillow's limit
    proc = subprocess.run([sys.executable, "-m", "serve_cli", "predict", str(folder), "--model", str(exported_run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "image too large" in proc.stdout
    assert "DecompressionBomb" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- a second hostile pass over this round's changes ---------------------------------------------------------

def test_output_link_to_dev_stdout_is_written_through(exported_run: Path, tmp_path: Path) -> None:
    folder = pngs(tmp_path / "imgs", 3)
    link = tmp_path / "so"
    link.symlink_to("/dev/stdout")
    redirect = tmp_path / "redirect.txt"
    with open(redirect, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "serve_cli", *predict(exported_run, folder, link)], cwd=ROOT,
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
        inode = os.fstat(out.fileno()).st_ino
    assert proc.returncode == 0, proc.stderr
    assert redirect.stat().st_ino == inode and link.is_symlink()  # the shell's file, not a replacement
    assert redirect.read_text().startswith("path,") and len(redirect.read_text().splitlines()) == 4


def test_output_keeps_its_owner_and_refuses_a_trailing_slash(exported_run: Path, tmp_path: Path, capsys) -> None:
    folder = pngs(tmp_path / "imgs", 2)
    owned = tmp_path / "owned.csv"
    owned.write_text("old\n")
    try:
        os.chown(owned, 65534, 65534)
    except PermissionError:
        pytest.skip("changing a file's owner needs root")
    assert serve(predict(exported_run, folder, owned)) == 0
    assert (owned.stat().st_uid, owned.stat().st_gid) == (65534, 65534) and owned.read_text().startswith("path,")
    capsys.readouterr()
    assert serve(predict(exported_run, folder, f"{owned}/")) == 2
    one_error_line(capsys.readouterr().err, "ends with / but is not a folder")
    assert owned.read_text().startswith("path,")


def test_stop_message_says_where_rows_went(tmp_path: Path) -> None:
    from serve_cli.output import Written, what_became_of
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    assert what_became_of(str(fifo), Written()) == f"{fifo} holds the rows written so far (incomplete)"
    assert what_became_of(str(tmp_path / "rows.csv"), Written()) == "no --output file was written"
    assert what_became_of(None, Written()) == "the rows printed so far are incomplete"
    rows = str(tmp_path / "rows.csv")
    assert what_became_of(rows, Written(complete=True)) == f"every row was written to {rows}"  # a stop at the end


def test_damaged_bytes_inside_a_readable_cache_are_caught_and_repaired(tmp_path: Path) -> None:
    from distributed.folder import CACHE_NAME, load_folder
    folder = digit_folder(tmp_path / "pics", per_class=5)
    first = load_folder(folder)
    cache = folder / CACHE_NAME
    data = bytearray(cache.read_bytes())
    data[-3000:-2800] = bytes(200)  # inside the tensors; the zip and the pickle still read
    cache.write_bytes(bytes(data))
    again = load_folder(folder)
    assert not again.from_cache and again.cache_note == "decoded and cached"
    assert torch.equal(again.train_images, first.train_images) and load_folder(folder).from_cache


def test_names_that_are_not_utf8(tmp_path: Path, capsys) -> None:
    from distributed.train import main as train
    folder = digit_folder(tmp_path / "pics")
    first = sorted((folder / "zero").iterdir())[0]
    os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.png")  # a file name: trained, like any other
    assert train(folder_args(folder, tmp_path / "run", 1)) == 0
    capsys.readouterr()
    os.rename(folder / "one", os.fsencode(folder) + b"/\xffone")  # a class name: refused in one line
    assert train(folder_args(folder, tmp_path / "run2", 1)) == 1
    one_error_line(capsys.readouterr().err, "is not a printable UTF-8 name: rename it")


def test_export_with_a_damaged_test_set_gates_on_random_images(ddp_run: Path, synthetic_data: Path,
                                                              tmp_path: Path, capsys) -> None:
    import shutil
    from export.__main__ import main as export
    data = Path(shutil.copytree(synthetic_data, tmp_path / "data"))
    images = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    assert export(["--run-dir", str(ddp_run), "--out-dir", str(tmp_path / "out"), "--data-dir", str(data),
                   "--batch-sizes", "1,64"]) == 0
    out = capsys.readouterr().out
    assert "seeded uniform random images (1000), the test set in" in out and "is damaged" in out


def test_batchnorm_needs_two_training_images(synthetic_data: Path, tmp_path: Path, capsys) -> None:
    from distributed.train import main as train
    assert train(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--model", "recordnet",
                  "--val-size", "639", "--epochs", "1", "--device", "cpu"]) == 1
    one_error_line(capsys.readouterr().err, "needs at least 2 training images, and mnist leaves 1")


def test_a_mid_epoch_export_does_not_claim_an_earlier_epochs_accuracy(synthetic_data: Path, tmp_path: Path) -> None:
    import json
    from distributed import comms
    from distributed.config import parse_args
    from distributed.train import Preempted, StopRequest, run
    from export.__main__ import main as export
    cfg = parse_args(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path / "run"), "--val-size", "64",
                      "--epochs", "2", "--model", "mlp", "--batch-size", "16", "--device", "cpu"])
    assert run(cfg, comms.setup("cpu"))["epochs"] == 2
    cfg = parse_args(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path / "run"), "--val-size", "64",
                      "--epochs", "3", "--model", "mlp", "--batch-size", "16", "--device", "cpu"])
    with pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"), stop=StopRequest(signal=15))  # step 10 of epoch 3: last.pt is mid-epoch
    assert export(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--out-dir",
                   str(tmp_path / "out"), "--batch-sizes", "1,64"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["test_accuracy"] is None and manifest["parity"]["training_test_set"] is False
