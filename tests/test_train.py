"""The trainer end to end in one process (world size 1) on tiny synthetic MNIST."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import final_weights, preempted_after_epoch
from distributed import checkpoint, comms
from distributed.config import SEED_RECIPE, parse_args
from distributed.timing import PHASES
from distributed.train import Preempted, main, run

REQUIRED_METRICS = {"test_accuracy", "test_loss", "val_accuracy", "epochs", "world_size",
                    "train_images_per_second", "train_seconds", "task", "model", "classes"}


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--run-dir", str(run_dir), "--val-size", "64", "--epochs", "2",
            "--log-every", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def run_dir(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(args(synthetic_data, out)) == 0
    return out


def test_metrics_json_records_what_the_run_learned_and_did(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert REQUIRED_METRICS <= metrics.keys()
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1 and metrics["task"] == "digits"
    assert metrics["classes"] == [str(d) for d in range(10)]
    assert metrics["test_accuracy"] > 0.5  # synthetic digits are easy: learning happened
    assert metrics["train_seconds"] > 0 and metrics["train_images_per_second"] > 0
    assert metrics["train_images"] == 2 * (640 - 64)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2


def test_phase_breakdown_covers_the_run(run_dir: Path) -> None:
    phases = json.loads((run_dir / "metrics.json").read_text())["phase_seconds"]
    train_seconds = json.loads((run_dir / "metrics.json").read_text())["train_seconds"]
    assert list(phases) == list(PHASES) and all(v > 0 for v in phases.values())
    # the training phase holds every training step, and little else (the per-step logging)
    assert train_seconds <= phases["training"] + 0.01 <= train_seconds * 1.5 + 0.5


def test_checkpoints_load_with_weights_only(run_dir: Path) -> None:
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert {"version", "model", "optimizer", "scheduler", "scaler", "config", "rng", "run"} <= state.keys()
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert last["run"]["epoch"] == 2 and last["run"]["step"] == 2 * 9
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_tensorboard_event_file(run_dir: Path) -> None:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "test/loss", "test/accuracy", "val/accuracy",
                "perf/images_per_second", "perf/epoch_seconds", "perf/train_seconds"):
        assert tag in tags["scalars"], tag
    assert {"test/predictions", "test/confusion_matrix"} <= set(tags["images"])
    assert tags["graph"]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, 19, 2))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test_accuracy"])


def test_same_seed_same_weights(synthetic_data, run_dir: Path, tmp_path: Path) -> None:
    assert main(args(synthetic_data, tmp_path)) == 0
    a, b = final_weights(run_dir), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_matches_uninterrupted_run(synthetic_data, run_dir: Path, tmp_path: Path) -> None:
    cfg = parse_args(args(synthetic_data, tmp_path))
    env = comms.setup("cpu")
    with preempted_after_epoch(1), pytest.raises(Preempted, match="at epoch 1"):
        run(cfg, env)
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]["epoch"] == 1
    assert main(args(synthetic_data, tmp_path)) == 0  # finds last.pt and resumes
    a, b = final_weights(run_dir), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    steps = [e.step for e in EventAccumulator(str(tmp_path)).Reload().Scalars("train/loss")]
    assert steps == sorted(set(steps))  # no duplicated or rewound steps after the restart


def test_no_resume_starts_over(synthetic_data, run_dir: Path, tmp_path: Path) -> None:
    assert main(args(synthetic_data, tmp_path, "--epochs", "1")) == 0
    assert main(args(synthetic_data, tmp_path, "--no-resume")) == 0
    # a fresh 2-epoch run, bit for bit; resuming the 1-epoch run would have re-fitted its schedule instead
    a, b = final_weights(run_dir), final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"]] == [1, 2]


def differs_from_plain_run(synthetic_data, tmp_path: Path, *flags: str) -> bool:
    """Whether one epoch of mlp with `flags` ends with other weights than the same run without them."""
    base = ("--model", "samnet", "--epochs", "1")
    assert main(args(synthetic_data, tmp_path / "plain", *base)) == 0
    assert main(args(synthetic_data, tmp_path / "flags", *base, *flags)) == 0
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "flags")
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_amp_bf16_on_cpu_trains(synthetic_data, tmp_path: Path) -> None:
    assert differs_from_plain_run(synthetic_data, tmp_path, "--amp", "bf16")  # autocast really ran
    assert main(args(synthetic_data, tmp_path / "b", "--amp", "bf16", "--model", "samnet", "--task", "binary")) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["amp"] == "bfloat16" and metrics["classes"] == ["0-4", "5-9"]
    assert metrics["test_accuracy"] > 0.6


def test_seed_recipe_is_expressible(synthetic_data, tmp_path: Path) -> None:
    cfg = parse_args(SEED_RECIPE + ["--task", "binary", "--model", "samnet"])
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.batch_size, cfg.schedule) == ("sgd", 0.01, 0.5, 64, "none")
    assert main(args(synthetic_data, tmp_path, *SEED_RECIPE, "--epochs", "1")) == 0


def test_overfit_batches_drives_loss_to_zero(synthetic_data, tmp_path: Path) -> None:
    assert main(args(synthetic_data, tmp_path, "--overfit-batches", "1", "--epochs", "40",
                     "--schedule", "none", "--lr", "2e-3", "--label-smoothing", "0")) == 0  # smoothing stops at ~0.1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_count"] == 64  # evaluated on the same batch it trained on
    assert metrics["test_loss"] < 0.05 and metrics["test_accuracy"] == 1.0


def test_batch_size_help_says_micro_batch_and_global_batch(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "micro-batch: the most images one rank computes at once" in out
    assert "images per optimiser step over all ranks, the same at any world size" in out


def test_missing_data_dir_is_one_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["--data-dir", str(tmp_path / "absent"), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MNIST not found" in err[0] and "train-images-idx3-ubyte.gz" in err[0]


def test_unknown_model_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", "resnet"])
    assert exc.value.code == 2
    assert "unknown --model 'resnet'" in capsys.readouterr().err


def test_corrupt_checkpoint_is_one_clear_error(synthetic_data, tmp_path: Path, capsys) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint at all")
    assert main(args(synthetic_data, tmp_path)) == 1
    assert "is not a readable checkpoint" in capsys.readouterr().err


def test_resume_without_checkpoint_is_an_error(synthetic_data, tmp_path: Path, capsys) -> None:
    assert main(args(synthetic_data, tmp_path, "--resume")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_stop_mid_epoch_then_resume_matches_uninterrupted(synthetic_data, tmp_path: Path) -> None:
    stop_mid_epoch_then_resume(synthetic_data, tmp_path, "cpu")


def test_a_checkpoint_from_before_the_global_batch_resumes_mid_epoch_exactly(synthetic_data, tmp_path: Path) -> None:
    """A mid-epoch last.pt without config.global_batch_size (nor run.steps_per_epoch), and with the position in
    the epoch under its old name run.batch_in_epoch, as earlier releases wrote it: migrated (the global batch
    to --batch-size x its world size), it continues to an uninterrupted run's weights."""
    from conftest import resave
    from distributed.train import StopRequest
    extra = ("--batch-size", "16", "--epochs", "1", "--model", "samnet", "--run-dir")
    assert main(args(synthetic_data, tmp_path / "a", *extra, str(tmp_path / "a"))) == 0
    cfg = parse_args(args(synthetic_data, tmp_path / "b", *extra, str(tmp_path / "b")))
    with pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"), stop=StopRequest(signal=15))
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    del state["config"]["global_batch_size"], state["run"]["steps_per_epoch"]
    state["run"]["batch_in_epoch"] = state["run"].pop("step_in_epoch")
    assert state["run"]["batch_in_epoch"] > 0
    resave(last, state)
    assert main(args(synthetic_data, tmp_path / "b", *extra, str(tmp_path / "b"))) == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load(last)["config"]["global_batch_size"] == 16


def stop_mid_epoch_then_resume(data: Path, tmp_path: Path, device: str) -> None:
    """SIGTERM's path in-process: stop at step 10 of 36, checkpoint mid-epoch, resume, same final weights.
    Dropout and augmentation draw random numbers, so each rank's RNG state must come back too."""
    from distributed.train import StopRequest
    extra = ("--batch-size", "16", "--epochs", "1", "--model", "samnet", "--augment", "--device", device, "--run-dir")
    assert main(args(data, tmp_path / "a", *extra, str(tmp_path / "a"))) == 0
    cfg = parse_args(args(data, tmp_path / "b", *extra, str(tmp_path / "b")))
    with pytest.raises(Preempted, match="stopped by signal 15 at epoch 1, step 10"):
        run(cfg, comms.setup(device), stop=StopRequest(signal=15))
    state = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert (state["run"]["epoch"], state["run"]["step"], state["run"]["step_in_epoch"]) == (0, 10, 10)
    assert main(args(data, tmp_path / "b", *extra, str(tmp_path / "b"))) == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == 36


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fp16_overflow_skips_the_step_backs_off_and_the_scale_survives_a_resume(synthetic_data, tmp_path: Path,
                                                                               device: str) -> None:
    """An inf gradient at step 3: the step is skipped (the optimiser counts 8 of 9), the scale halves, the run
    does not call it divergence, and a resumed run starts from the halved scale, not the default."""
    from distributed.timing import Phases
    from distributed.train import StopRequest, Trainer
    cfg = parse_args(args(synthetic_data, tmp_path, "--amp", "fp16", "--model", "mlp", "--device", device))
    env = comms.setup(device)
    trainer = Trainer.build(cfg, env, StopRequest(), Phases())
    fresh = trainer.parts.scaler.get_scale() if trainer.parts.scaler.is_enabled() else None
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 3 else grad
    try:
        next(trainer.parts.model.parameters()).register_hook(poison)
        with preempted_after_epoch(1), pytest.raises(Preempted):
            trainer.fit()
    finally:
        trainer.close()
    assert trainer.parts.scaler.is_enabled() and fresh == 65536.0
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["run"]["step"] == 9 and saved["scaler"]["scale"] == fresh / 2
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {8}
    resumed = Trainer.build(cfg, env, StopRequest(), Phases())
    try:
        assert resumed.parts.scaler.get_scale() == fresh / 2
        assert resumed.fit()["epochs"] == 2
    finally:
        resumed.close()


def test_checkpoint_every_steps_saves_mid_epoch(synthetic_data, tmp_path: Path, monkeypatch) -> None:
    saved: list[tuple[int, int]] = []
    real_save = checkpoint.save

    def recording_save(path: Path, state: dict) -> None:
        if path.name == "last.pt":
            saved.append((state["run"]["step"], state["run"]["step_in_epoch"]))
        real_save(path, state)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    cfg = parse_args(args(synthetic_data, tmp_path, "--batch-size", "16", "--checkpoint-every-steps", "7"))
    with preempted_after_epoch(1), pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"))
    # mid-epoch saves every 7 steps (step_in_epoch > 0), then the epoch-end save at step 36
    assert saved == [(7, 7), (14, 14), (21, 21), (28, 28), (35, 35), (36, 0)]


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "step"])
def test_resume_with_more_epochs_refits_the_schedule(synthetic_data, tmp_path: Path, capsys, schedule: str) -> None:
    """1 epoch, then resumed to 3: the learning rates of a 3-epoch run from the start (a chained schedule, cosine
    or step, re-fitted from the rate the checkpoint had reached would compound it)."""
    flags = ("--model", "mlp", "--schedule", schedule)
    assert main(args(synthetic_data, tmp_path / "resumed", *flags, "--epochs", "1")) == 0
    assert main(args(synthetic_data, tmp_path / "resumed", *flags, "--epochs", "3")) == 0  # OneCycle cannot go on
    assert "resuming with --epochs 1 -> 3: schedule re-fitted to the new length" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert main(args(synthetic_data, tmp_path / "straight", *flags, "--epochs", "3")) == 0
    lr = [checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["optimizer"]["param_groups"][0]["lr"]
          for name in ("resumed", "straight")]
    assert lr[0] == pytest.approx(lr[1], rel=1e-12)


def test_resume_with_fewer_epochs_than_done_mid_epoch_only_scores(synthetic_data, tmp_path: Path) -> None:
    from distributed.train import Preempted, StopRequest
    cfg = parse_args(args(synthetic_data, tmp_path, "--model", "mlp", "--batch-size", "16", "--epochs", "1"))
    assert run(cfg, comms.setup("cpu"))["epochs"] == 1
    cfg = parse_args(args(synthetic_data, tmp_path, "--model", "mlp", "--batch-size", "16", "--epochs", "3"))
    with pytest.raises(Preempted):
        run(cfg, comms.setup("cpu"), stop=StopRequest(signal=15))  # mid-epoch 2
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["run"]["step_in_epoch"] > 0
    assert main(args(synthetic_data, tmp_path, "--model", "mlp", "--batch-size", "16", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 1


def test_augment_and_label_smoothing_train(synthetic_data, tmp_path: Path) -> None:
    assert main(args(synthetic_data, tmp_path, "--model", "recordnet", "--augment", "--label-smoothing", "0.1",
                     "--epochs", "3")) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.3  # learns despite shifted and rotated bars
    assert json.loads((tmp_path / "config.json").read_text())["augment"] is True


def test_augment_changes_training(synthetic_data, tmp_path: Path) -> None:
    assert differs_from_plain_run(synthetic_data, tmp_path, "--augment")


def test_label_smoothing_changes_training(synthetic_data, tmp_path: Path) -> None:
    assert differs_from_plain_run(synthetic_data, tmp_path, "--label-smoothing", "0.2")  # the default is 0.1
