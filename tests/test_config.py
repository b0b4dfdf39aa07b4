"""TrainConfig checks itself: a config built in code meets the same checks as one from the command line, and
every flag says which kind it is (what a resume may change)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from distributed.config import KINDS, ConfigError, TrainConfig, flags_of
from distributed.train import main as train


@pytest.mark.parametrize("fields, needle", [
    ({"lr": -1.0}, "--lr: -1.0 is not in (0, inf]"),
    ({"epochs": 0}, "--epochs: 0 is not in [1,"),
    ({"momentum": 1.0}, "--momentum: 1.0 is not in [0, 1)"),
    ({"seed": 2 ** 40}, "--seed: 1099511627776 is not in [0, 4294967296)"),
    ({"epochs": 1.5}, "--epochs: '1.5' is not a whole number"),
    ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop': choose one of sgd, adam, adamw"),
    ({"model": "nonet"}, "unknown --model 'nonet'"),
    ({"task": "letters"}, "--task 'letters': choose one of"),
    ({"dataset": "kmnist", "task": "digits"}, "--task digits is MNIST's"),
    ({"model": "recordnet", "batch_size": 1}, "--batch-size 1: recordnet has BatchNorm"),
    ({"model": "recordnet", "global_batch_size": 1}, "--global-batch-size 1: recordnet has BatchNorm"),
    ({"run_dir": " "}, "--run-dir: an empty path"),
])
def test_a_config_built_in_code_is_checked(fields: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        TrainConfig(**fields)
    assert needle in str(e.value), e.value


def test_a_valid_config_survives_replace() -> None:
    cfg = TrainConfig(dataset="kmnist", model="recordnet")
    assert cfg.task == "kmnist"
    assert dataclasses.replace(cfg, global_batch_size=128).task == "kmnist"  # the derived task is not "given"
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, global_batch_size=1)


def test_every_flag_has_one_kind_and_the_memory_layout_is_a_runtime_flag() -> None:
    assert sorted(sum((flags_of(kind) for kind in KINDS), ())) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert "channels_last" in flags_of("runtime") and "compile" in flags_of("runtime")


def test_resuming_with_another_memory_layout_continues(synthetic_data: Path, tmp_path: Path, capsys) -> None:
    args = ["--data-dir", str(synthetic_data), "--run-dir", str(tmp_path), "--val-size", "64", "--model", "tinyconv",
            "--device", "cpu"]
    assert train([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert train([*args, "--epochs", "2", "--no-channels-last"]) == 0, capsys.readouterr().err
    assert "another experiment" not in capsys.readouterr().err
