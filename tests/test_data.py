import pytest
import torch

from conftest import ROOT
from distributed.data import MEAN, STD, TASKS, load_splits, normalize, to_unit
from distributed.datasets import DataError, read_mnist
from distributed.sampling import eval_shard

CPU = torch.device("cpu")


def test_task_label_maps() -> None:
    digits = torch.arange(10)
    assert TASKS["binary"].map_labels(digits).tolist() == [0] * 5 + [1] * 5
    assert TASKS["binary"].classes == ("0-4", "5-9")
    assert TASKS["digits"].map_labels(digits).tolist() == list(range(10))


def test_normalize() -> None:
    x = normalize(to_unit(torch.tensor([[[0, 255]]], dtype=torch.uint8)))
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32
    assert torch.allclose(x.flatten(), torch.tensor([-MEAN / STD, (1 - MEAN) / STD]))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_shards_are_exact(world: int) -> None:
    shards = [eval_shard(1000, r, world, CPU).tolist() for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(1000))  # every image exactly once: no padding duplicates


def test_splits_are_seeded_and_disjoint(synthetic_data) -> None:
    train, val, test, _ = load_splits(synthetic_data, TASKS["digits"], 64, seed=3, device=CPU)
    assert (len(train), len(val), len(test)) == (576, 64, 200)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (28, 28)
    _, val2, _, _ = load_splits(synthetic_data, TASKS["digits"], 64, seed=3, device=CPU)
    assert torch.equal(val.images, val2.images)
    raw, _ = read_mnist(synthetic_data, train=True)
    seen = {bytes(img.numpy()) for img in val.images}
    assert not seen & {bytes(img.numpy()) for img in train.images}
    assert len(seen) + len(train) == len(raw)


def test_binary_labels_from_files(synthetic_data) -> None:
    _, digits = read_mnist(synthetic_data, train=False)
    _, _, test, _ = load_splits(synthetic_data, TASKS["binary"], 0, seed=0, device=CPU)
    assert torch.equal(test.labels, (digits >= 5).long())


def test_missing_data_says_where_to_put_the_files(tmp_path) -> None:
    with pytest.raises(DataError, match=r"MNIST/raw.*train-images-idx3-ubyte.gz"):
        read_mnist(tmp_path / "nowhere", train=True)


def test_random_affine_keeps_background_and_moves_ink() -> None:
    from distributed.data import random_affine
    torch.manual_seed(0)
    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 1.0
    assert torch.allclose(random_affine(x, 0.0, 0.0, 0.0), x, atol=1e-5)  # no-op when every range is 0
    moved = random_affine(x)
    assert moved.shape == x.shape and moved.min() >= 0 and moved.max() <= 1
    assert (moved[:, :, :2, :] == 0).all()  # padding is the background, not a bright frame
    assert not torch.allclose(moved[0], moved[1])  # each image gets its own transform
    assert (moved.sum((1, 2, 3)) / x.sum((1, 2, 3))).sub(1).abs().max() < 0.35  # ink kept, roughly


def test_augmented_batches_are_normalised_like_plain_ones() -> None:
    from distributed.data import Split
    split = Split(torch.full((32, 28, 28), 100, dtype=torch.uint8), torch.arange(32) % 10)
    index = torch.arange(32)
    torch.manual_seed(0)
    plain, y = split.batch(index)
    augmented, y2 = split.batch(index, augment=True)
    assert torch.equal(y, y2) and plain.shape == augmented.shape
    assert torch.allclose(plain, torch.full_like(plain, (100 / 255 - MEAN) / STD))
    padding = (augmented - (-MEAN / STD)).abs() < 1e-5  # pixels moved in from outside the image
    assert padding.any() and padding.float().mean() < 0.5
    assert augmented.max() <= plain.max() + 1e-5


def test_extracted_files_are_read_as_torchvision_reads_them_without_importing_it(synthetic_data) -> None:
    import subprocess
    import sys

    from torchvision.datasets import MNIST
    for train in (True, False):
        images, digits = read_mnist(synthetic_data, train)
        ds = MNIST(str(synthetic_data), train=train, download=True)
        assert images.dtype == torch.uint8 and torch.equal(images, ds.data) and torch.equal(digits, ds.targets)
    # torchvision costs ~2 s per process to import: the hot path must not pay it
    code = (f"import sys; from distributed.datasets import read_mnist; read_mnist({str(synthetic_data)!r}, True); "
            f"sys.exit('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
