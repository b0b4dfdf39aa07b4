"""export refuses what it must not do: a folder it did not write, a model that fails the gate, a
tampered manifest, a damaged checkpoint, weights that are not the ones scored; nothing is left half-done."""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import edit_manifest, flip_weight_bytes, one_error_line, pngs, resave, run, snapshot
from distributed import checkpoint
from distributed.train import main as train
from export.__main__ import main as export
from serve_cli.__main__ import main as serve

pytestmark = pytest.mark.slow


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
    int8 = ["model.int8.onnx"] if "onnx_int8" in new_manifest["artifacts"] else []
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.txt", "model.onnx.bak", "manifest.json", "model.onnx", "model.ts", "model.pt2", *int8])
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
        if "int8_logits" in m["reference"]:
            m["reference"]["int8_logits"] = [row[:9] for row in m["reference"]["int8_logits"]]
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


def test_flipped_bytes_in_a_checkpoint_are_refused_by_export_and_resume(ddp_run: Path, synthetic_data: Path,
                                                                       tmp_path: Path, capsys) -> None:
    import shutil

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
    recorded = checkpoint.load(exported_run.parent / "checkpoints" / "best.pt")["metrics"]["test_accuracy"]
    assert parity["runtimes"]["eager"]["accuracy"] == pytest.approx(recorded, abs=1e-9)


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
