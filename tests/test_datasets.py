"""Datasets of the built-in driver: planted ground truth matches the generated data, real
loaders fail helpfully without files, and IndexedDataset carries example ids."""

import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dynascope.recorder.driver.datasets import (
    DATASETS,
    DatasetUnavailableError,
    load_dataset,
    register_dataset,
)
from dynascope.recorder.indexed import IndexedDataset

torch.set_num_threads(1)

N, N_TEST = 600, 200


@pytest.fixture(scope="module")
def planted():
    return load_dataset("planted", train_size=N, test_size=N_TEST, seed=3)


def _sky_score(images: np.ndarray) -> np.ndarray:
    """Mean blue-minus-red intensity of the top quarter: the planted 'sky' band."""
    band = images[:, :, : images.shape[2] // 4, :]
    return band[:, 2].mean(axis=(1, 2)) - band[:, 0].mean(axis=(1, 2))


def test_planted_bundle_shape_and_metadata(planted):
    assert planted.name == "planted"
    assert planted.input_shape == (3, 32, 32)
    assert planted.num_classes == 10 and len(planted.class_names) == 10
    assert len(planted.train) == N and len(planted.test) == N_TEST
    x, y = planted.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == planted.train_targets[5]
    # Balanced clean classes.
    assert np.all(np.bincount(planted.ground_truth["clean_target"], minlength=10) == N // 10)
    meta = planted.describe()
    assert meta["num_examples"] == N and meta["input_shape"] == [3, 32, 32]
    assert meta["task"] == "classification"


def test_planted_ground_truth_dtypes(planted):
    gt = planted.ground_truth
    assert set(gt) == {"is_mislabeled", "clean_target", "has_planted_feature"}
    assert gt["is_mislabeled"].dtype == bool and gt["has_planted_feature"].dtype == bool
    assert gt["clean_target"].dtype == np.int64
    assert all(v.shape == (N,) for v in gt.values())


def test_planted_label_noise_exact(planted):
    gt, targets = planted.ground_truth, planted.train_targets
    flipped = gt["is_mislabeled"]
    assert flipped.sum() == round(0.1 * N)
    assert np.all(targets[flipped] != gt["clean_target"][flipped])
    assert np.all(targets[~flipped] == gt["clean_target"][~flipped])
    assert np.all((targets >= 0) & (targets < 10))
    # Flips are drawn among examples without the planted feature (kept separable).
    assert not np.any(flipped & gt["has_planted_feature"])


def test_planted_feature_in_planted_classes_and_present(planted):
    gt = planted.ground_truth
    has = gt["has_planted_feature"]
    assert has.sum() == round(0.1 * N)
    assert set(gt["clean_target"][has]) == {0, 1}
    assert np.bincount(gt["clean_target"][has], minlength=2)[:2].tolist() == [N // 20, N // 20]
    score = _sky_score(planted.train.images.numpy())
    # Every planted example shows the band, and no other example comes close.
    assert score[has].min() > 1.5
    assert score[has].min() > score[~has].max() + 0.5
    # Large norm: the band carries much more energy than the same rows elsewhere.
    band = planted.train.images.numpy()[:, :, :8]
    energy = (band ** 2).mean(axis=(1, 2, 3))
    assert energy[has].mean() > 1.5 * energy[~has].mean()


def test_planted_test_split_clean_with_feature(planted):
    tgt = planted.test_ground_truth
    assert not tgt["is_mislabeled"].any()
    assert np.array_equal(np.asarray(planted.test.targets), tgt["clean_target"])
    has = tgt["has_planted_feature"]
    assert has.sum() == round(0.1 * N_TEST)
    assert set(tgt["clean_target"][has]) == {0, 1}
    assert _sky_score(planted.test.images.numpy())[has].min() > 1.5


def test_planted_deterministic_from_seed():
    a = load_dataset("planted", train_size=200, test_size=50, seed=7)
    b = load_dataset("planted", train_size=200, test_size=50, seed=7)
    c = load_dataset("planted", train_size=200, test_size=50, seed=8)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.images, b.test.images)
    for key in a.ground_truth:
        assert np.array_equal(a.ground_truth[key], b.ground_truth[key])
    assert not torch.equal(a.train.images, c.train.images)
    assert not np.array_equal(a.ground_truth["is_mislabeled"], c.ground_truth["is_mislabeled"])


def test_planted_control_has_no_feature():
    ctl = load_dataset("planted", train_size=300, test_size=100, planted_fraction=0.0)
    assert not ctl.ground_truth["has_planted_feature"].any()
    assert not ctl.test_ground_truth["has_planted_feature"].any()
    assert _sky_score(ctl.train.images.numpy()).max() < 1.5
    assert ctl.ground_truth["is_mislabeled"].sum() == 30
    named = load_dataset("planted-control", train_size=300, test_size=100)
    assert named.name == "planted-control"
    assert torch.equal(named.train.images, ctl.train.images)


def test_planted_options():
    b = load_dataset("planted", num_train=120, num_test=30, num_classes=4, label_noise=0.25,
                     planted_fraction=0.3, planted_classes=(1, 2, 3))
    gt = b.ground_truth
    assert len(b.train) == 120 and len(b.test) == 30 and b.num_classes == 4
    assert gt["is_mislabeled"].sum() == 30
    assert gt["has_planted_feature"].sum() == 36
    assert set(gt["clean_target"][gt["has_planted_feature"]]) == {1, 2, 3}
    with pytest.raises(ValueError, match="planted_classes"):
        load_dataset("planted", num_train=100, planted_classes=(0,))
    with pytest.raises(ValueError, match="planted_fraction"):
        load_dataset("planted", num_train=100, planted_fraction=0.5)  # > 2 classes' worth


def test_planted_thumbnails(planted):
    img = planted.train_images_uint8()
    assert img.shape == (N, 32, 32, 3) and img.dtype == np.uint8
    has = planted.ground_truth["has_planted_feature"]
    top = img[:, :8].astype(float)
    # Sky is visibly blue in the thumbnails too.
    assert (top[has, ..., 2] - top[has, ..., 0]).mean() > 80


def test_unknown_dataset():
    with pytest.raises(ValueError, match="available: .*planted"):
        load_dataset("imagenet")


def test_register_dataset_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("planted")(lambda **kw: None)
    assert {"cifar10", "mnist", "fashion-mnist", "planted", "planted-control"} <= set(DATASETS)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("mnist", "MNIST/raw"),
                                         ("fashion-mnist", "FashionMNIST/raw")])
def test_missing_dataset_says_what_to_do(tmp_path, name, folder):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, data_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "not found under" in msg and str(tmp_path) in msg
    assert "--download" in msg and f"'{folder}'" in msg and "--dataset planted" in msg
    assert isinstance(info.value, RuntimeError)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no torchvision trace


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DatasetUnavailableError, match="could not be downloaded.*name resolution"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)


def _write_idx(path, array: np.ndarray):
    code = {1: 0x0801, 3: 0x0803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", code) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    """A tiny MNIST in torchvision's raw idx format, so the real loader path runs offline."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


def test_mnist_loader_with_files(fake_mnist):
    b = load_dataset("mnist", data_dir=fake_mnist, train_size=10, test_size=5, seed=1)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert len(b.train) == 10 and len(b.test) == 5 and b.ground_truth is None
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert [b.train[i][1] for i in range(10)] == b.train_targets.tolist()
    img = b.train_images_uint8()
    assert img.shape == (10, 28, 28, 1) and img.dtype == np.uint8
    # Thumbnails and tensors describe the same examples (undo the normalisation).
    pixels = (b.train[3][0][0] * 0.3081 + 0.1307) * 255
    assert np.allclose(pixels.numpy(), img[3, :, :, 0], atol=0.5)
    again = load_dataset("mnist", data_dir=fake_mnist, train_size=10, test_size=5, seed=1)
    assert again.train_targets.tolist() == b.train_targets.tolist()
    full = load_dataset("mnist", data_dir=fake_mnist)
    assert len(full.train) == 40 and len(full.test) == 12


def test_indexed_dataset_returns_indices(planted):
    ds = IndexedDataset(planted.train)
    assert len(ds) == N
    x, y, i = ds[17]
    assert i == 17 and y == planted.train_targets[17] and torch.equal(x, planted.train[17][0])
    assert ds.targets is planted.train.targets  # attributes pass through
    assert IndexedDataset(ds).dataset is planted.train  # no double wrapping
    loader = DataLoader(ds, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    xb, yb, ib = next(iter(loader))
    assert ib.dtype == torch.int64 and len(set(ib.tolist())) == 64
    assert torch.equal(xb, planted.train.images[ib])
    assert torch.equal(yb, torch.as_tensor(planted.train_targets[ib.numpy()]))
    assert pickle.loads(pickle.dumps(ds))[3][2] == 3  # picklable for DataLoader workers


def test_indexed_dataset_rejects_bad_inputs():
    with pytest.raises(TypeError, match="map-style"):
        IndexedDataset(iter([1, 2]))
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        IndexedDataset([1, 2, 3])[0]
