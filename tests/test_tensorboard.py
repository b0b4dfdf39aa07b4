"""The TensorBoard error analysis, read back from the event files as TensorBoard itself reads them."""
from __future__ import annotations

import io
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import ROOT, final_weights, torchrun
from distributed.data import TASKS, load_splits
from distributed.models import MODELS, build_model
from distributed.train import main

ALL = {"scalars": 0, "images": 0, "tensors": 0}
CLASSES = [str(d) for d in range(10)]
from conftest import synthetic_digits
from distributed.train import main as train


def events(run_dir: Path) -> EventAccumulator:
    return EventAccumulator(str(run_dir), size_guidance=ALL).Reload()


def final_probabilities(run_dir: Path, data: Path, val_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The final model's class probabilities on the whole test set, computed here independently of the trainer."""
    _, _, test, _ = load_splits(data, TASKS["digits"], val_size, 0, torch.device("cpu"))
    model = build_model(json.loads((run_dir / "metrics.json").read_text())["model"], 10)
    model.load_state_dict(final_weights(run_dir))
    with torch.inference_mode():
        probs = model.eval()(test.batch(torch.arange(len(test)))[0]).softmax(1)
    return probs, test.labels


def mistakes_table(acc: EventAccumulator) -> list[list[str]]:
    """The rows of the last `test/mistakes` text: rank, test index, true, predicted, confidence."""
    text = acc.Tensors("test/mistakes/text_summary")[-1].tensor_proto.string_val[0].decode()
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d+ \|", line)]


@pytest.fixture(scope="module")
def ddp_run(synthetic_data, tmp_path_factory) -> Path:
    """2 ranks, a weak model (mlp, low lr): about half the test images wrong, more than the gallery holds."""
    run_dir = tmp_path_factory.mktemp("weak")
    proc = subprocess.run(torchrun(2, "--data-dir", str(synthetic_data), "--run-dir", str(run_dir), "--model", "mlp",
                                   "--lr", "1e-3", "--val-size", "64", "--epochs", "2", "--eval-batch-size", "48",
                                   "--test-every-epoch"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def ddp_events(ddp_run: Path) -> EventAccumulator:
    return events(ddp_run)


def test_mistakes_gallery_holds_only_mistakes_most_confident_first(ddp_run, ddp_events, synthetic_data) -> None:
    probs, labels = final_probabilities(ddp_run, synthetic_data)
    predicted = probs.argmax(1)
    wrong = int((predicted != labels).sum())
    assert wrong > 64, "the fixture's weak model should make more mistakes than the gallery shows"
    rows = mistakes_table(ddp_events)
    assert len(rows) == min(64, wrong)
    index = [int(r[1]) for r in rows]
    confidence = [float(r[4]) for r in rows]
    assert confidence == sorted(confidence, reverse=True)
    for i, true, said, conf in zip(index, (r[2] for r in rows), (r[3] for r in rows), confidence):
        assert int(labels[i]) == int(true) != int(said) == int(predicted[i])
        assert conf == pytest.approx(float(probs[i].max()), abs=2e-4)
    # ... and the most confident of all the model's mistakes come first
    all_wrong = (probs.max(1).values * (predicted != labels)).sort(descending=True).values[:len(rows)]
    assert confidence[0] == pytest.approx(float(all_wrong[0]), abs=2e-4)
    image = ddp_events.Images("test/mistakes")[-1]
    gallery = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    columns = 4
    assert gallery.shape[0] % math.ceil(len(rows) / columns) == 0  # one row of tiles per 4 mistakes


def test_world_size_2_writes_each_tag_once(ddp_run, ddp_events) -> None:
    assert len(list(ddp_run.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    steps = [h["step"] for h in json.loads((ddp_run / "metrics.json").read_text())["history"]]
    assert len(steps) == 2
    for tag in ("test/accuracy", "test_per_class/recall/3", "perf/train_seconds"):
        assert [e.step for e in ddp_events.Scalars(tag)] == steps  # one event per epoch
    assert len(ddp_events.Images("test/mistakes")) == 2


def test_the_test_split_is_scored_once_where_it_is_read(synthetic_data, tmp_path: Path, monkeypatch) -> None:
    """By default the test split is scored after the last epoch only (the final metrics and the dashboard read
    it there); validation every epoch; --test-every-epoch scores it after each."""
    from distributed import comms
    from distributed.config import parse_args
    from distributed.train import Trainer, run
    scored = []
    score = Trainer.score
    monkeypatch.setattr(Trainer, "score", lambda self, split, *a, **k: scored.append(split is self.parts.test)
                        or score(self, split, *a, **k))
    flags = ["--data-dir", str(synthetic_data), "--val-size", "64", "--epochs", "3", "--model", "mlp", "--device", "cpu"]
    metrics = run(parse_args([*flags, "--run-dir", str(tmp_path / "once")]), comms.setup("cpu"))
    assert scored == [False, False, False, True]  # val, val, val and test
    assert [("test_accuracy" in h, "val_accuracy" in h) for h in metrics["history"]] == [(False, True)] * 2 + [(True, True)]
    acc = events(tmp_path / "once")
    assert [e.step for e in acc.Scalars("test/accuracy")] == [metrics["steps"]] and len(acc.Scalars("val/accuracy")) == 3
    assert len(acc.Images("test/mistakes")) == 1 and metrics["test_count"] == 200
    scored.clear()
    metrics = run(parse_args([*flags, "--run-dir", str(tmp_path / "every"), "--test-every-epoch"]), comms.setup("cpu"))
    assert scored == [False, True] * 3 and all("test_accuracy" in h for h in metrics["history"])


def test_per_class_recall_and_precision(ddp_run, ddp_events, synthetic_data) -> None:
    probs, labels = final_probabilities(ddp_run, synthetic_data)
    predicted = probs.argmax(1)
    for c in range(10):
        is_c, said_c = labels == c, predicted == c
        recall = ddp_events.Scalars(f"test_per_class/recall/{c}")[-1].value
        precision = ddp_events.Scalars(f"test_per_class/precision/{c}")[-1].value
        assert recall == pytest.approx(float((is_c & said_c).sum() / max(int(is_c.sum()), 1)), abs=1e-6)
        assert precision == pytest.approx(float((is_c & said_c).sum() / max(int(said_c.sum()), 1)), abs=1e-6)


def test_pr_curve_per_class(ddp_run, ddp_events, synthetic_data) -> None:
    _, labels = final_probabilities(ddp_run, synthetic_data)
    for c in range(10):
        curve = torch.tensor(np.array(ddp_events.Tensors(f"pr/{c}")[-1].tensor_proto.float_val)).view(6, -1)
        true_positive, false_positive = curve[0], curve[1]
        # at the lowest threshold every image is called c: TP = images of c, FP = all the others
        assert int(true_positive[0]) == int((labels == c).sum())
        assert int(false_positive[0]) == int((labels != c).sum())


def test_projector_files_agree(ddp_run, synthetic_data) -> None:
    config = (ddp_run / "projector_config.pbtxt").read_text()
    paths = dict(re.findall(r'(\w+_path): "([^"]+)"', config))
    tensors = np.loadtxt(ddp_run / paths["tensor_path"], delimiter="\t", ndmin=2)
    metadata = (ddp_run / paths["metadata_path"]).read_text().splitlines()
    sprite = Image.open(ddp_run / paths["image_path"])
    n = 200  # the whole synthetic test set (fewer than 2,000 images)
    assert tensors.shape == (n, 20)  # mlp's last linear layer takes 20 features
    assert metadata[0].split("\t") == ["label", "predicted", "correct"] and len(metadata) == n + 1
    probs, labels = final_probabilities(ddp_run, synthetic_data)
    for i, line in enumerate(metadata[1:]):
        label, said, correct = line.split("\t")
        assert (int(label), int(said)) == (int(labels[i]), int(probs[i].argmax()))
        assert correct == ("yes" if label == said else "no")
    side = math.ceil(math.sqrt(n))
    assert sprite.size == (side * 28, side * 28)
    assert re.search(r"single_image_dim: 28\s+single_image_dim: 28", config)


def test_hparams_use_the_curves_and_leave_no_lone_points(ddp_events) -> None:
    assert not [t for t in ddp_events.Tags()["scalars"] if t.startswith("hparam")]
    content = ddp_events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert metrics == ["test/accuracy", "val/accuracy", "test/loss", "perf/train_seconds"]
    assert set(metrics) <= set(ddp_events.Tags()["scalars"])
    names = {h.name for h in experiment.hparam_infos}
    assert {"task", "model", "lr", "seed", "world_size"} <= names and not names & {"run_dir", "data_dir"}
    session = plugin_data_pb2.HParamsPluginData.FromString(
        ddp_events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    # whole numbers as text (TensorBoard shows every number with 5 digits: 64 as 64.000), fractions as numbers
    assert session.hparams["world_size"].string_value == "2" and session.hparams["augment"].string_value == "false"
    assert session.hparams["batch_size"].string_value == "64" and session.hparams["lr"].number_value == 1e-3


def test_hparams_table_opens_on_what_tells_runs_apart(ddp_events) -> None:
    """TensorBoard's own ordering (its backend sorts by differs, then name; the table ticks the first five)."""
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit
    content = ddp_events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    _sort_and_reduce_to_hparams_limit(experiment)
    names = [h.name for h in experiment.hparam_infos]
    apart = ["dataset", "epochs", "global_batch_size", "lr", "model", "task", "world_size"]
    assert names[:7] == apart and [h.differs for h in experiment.hparam_infos[:8]] == [True] * 7 + [False]
    assert not {h.name for h in experiment.hparam_infos if h.HasField("domain_discrete")}  # no runs filtered out


def test_phase_breakdown(ddp_run, ddp_events) -> None:
    phases = json.loads((ddp_run / "metrics.json").read_text())["phase_seconds"]
    text = ddp_events.Tensors("run/phases/text_summary")[-1].tensor_proto.string_val[0].decode()
    for name, seconds in phases.items():
        assert f"| {name} | {seconds:.2f} |" in text


def test_zero_mistakes_and_no_validation(synthetic_data, tmp_path: Path) -> None:
    # a few batches learned by heart: the evaluation (on those same batches) has nothing to show
    assert main(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path / "overfit"), "--overfit-batches", "1",
                 "--val-size", "0", "--epochs", "15", "--device", "cpu", "--test-every-epoch"]) == 0
    acc = events(tmp_path / "overfit")
    assert json.loads((tmp_path / "overfit" / "metrics.json").read_text())["test_accuracy"] == 1.0
    last = acc.Images("test/mistakes")[-1]  # a note, not the previous epoch's gallery
    assert last.step == acc.Scalars("test/accuracy")[-1].step and last.height < 60
    assert acc.Tensors("test/mistakes/text_summary")[-1].tensor_proto.string_val[0].decode() == \
        "No mistakes on the 64 test images."
    assert main(["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path / "noval"), "--val-size", "0",
                 "--epochs", "1", "--device", "cpu"]) == 0
    acc = events(tmp_path / "noval")
    assert "val/accuracy" not in acc.Tags()["scalars"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["test/accuracy", "test/loss", "perf/train_seconds"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_projector_features_for_every_registry_model(name: str) -> None:
    from distributed.data import Split
    from distributed.evaluation import penultimate_features
    model = build_model(name, 10)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    split = Split(torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8), torch.arange(7) % 10)
    features = penultimate_features(model.train(), split, torch.arange(7), batch_size=3)
    assert features.shape == (7, last.in_features) and model.training  # the train/eval mode is restored
    with torch.inference_mode():  # the features are what the last layer classifies, in eval mode
        logits = model.eval()(split.batch(torch.arange(7))[0])
        assert torch.allclose(logits, last(features), atol=1e-5)


def test_three_hundred_classes_keep_every_tensorboard_artifact_bounded(tmp_path: Path) -> None:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distributed.report import CURVE_CLASSES, MATRIX_CLASSES
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
