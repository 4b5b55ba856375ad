"""Datasets of the built-in training driver: a registry of builders returning `DatasetBundle`s.

Real datasets (CIFAR-10, MNIST, Fashion-MNIST) load through torchvision and, when their files
are missing, fail with a `DatasetUnavailableError` that says what to do, not a traceback. The
offline `planted` dataset is generated (see `recorder.driver.planted` and docs/DATASETS.md) and
carries ground truth for label noise and an opposing signal.

Add a dataset with::

    @register_dataset("name")
    def _build(*, data_dir, download, train_size, test_size, seed, **options) -> DatasetBundle:
        ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from .planted import generate_planted, planted_class_names, to_uint8

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetBundle",
    "DatasetUnavailableError",
    "load_dataset",
    "register_dataset",
]

DATASETS: dict[str, Callable[..., "DatasetBundle"]] = {}


class DatasetUnavailableError(RuntimeError):
    """A dataset's files are missing (and could not be downloaded); the message says what to do."""


def register_dataset(name: str):
    """Decorator: register a builder
    ``f(*, data_dir, download, train_size, test_size, seed, **options) -> DatasetBundle``."""

    def decorate(builder):
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = builder
        return builder

    return decorate


@dataclass
class DatasetBundle:
    """A training and a held-out split plus what the recorder and reports need to know."""

    name: str
    train: Dataset  # map-style, returns (x, y)
    test: Dataset
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W)
    train_targets: np.ndarray  # int64 labels of the training split, in index order
    ground_truth: dict[str, np.ndarray] | None = None  # over the training split
    test_ground_truth: dict[str, np.ndarray] | None = None
    options: dict = field(default_factory=dict)  # the options it was built with
    # Returns the training images as uint8 (N, H, W, C); called lazily, only for thumbnails.
    images_fn: Callable[[], np.ndarray | None] | None = field(default=None, repr=False)

    def train_images_uint8(self) -> np.ndarray | None:
        """Training images as uint8 (N, H, W, C) in index order, for thumbnails; None if the
        dataset has no cheap image form."""
        return None if self.images_fn is None else self.images_fn()

    def describe(self) -> dict:
        """The store's root ``dataset`` attribute (docs/STORE.md)."""
        return {
            "name": self.name,
            "task": "classification",
            "num_examples": len(self.train),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "input_shape": list(self.input_shape),
            "options": dict(self.options),
        }


class ArrayDataset(Dataset):
    """Map-style dataset over in-memory arrays: ``ds[i] == (images[i], int(targets[i]))``."""

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray):
        self.images = torch.as_tensor(images)
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.images) != len(self.targets):
            raise ValueError("images and targets differ in length")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], int(self.targets[index])


def load_dataset(name: str, data_dir: str | os.PathLike = "data", download: bool = False,
                 train_size: int | None = None, test_size: int | None = None, seed: int = 0,
                 **options) -> DatasetBundle:
    """Build dataset `name`; `train_size`/`test_size` take a seeded random subset (kept in
    index order) so small runs are cheap and reproducible."""
    try:
        builder = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") \
            from None
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and size <= 0:
            raise ValueError(f"{label} must be positive, got {size}")
    return builder(data_dir=os.fspath(data_dir), download=download, train_size=train_size,
                   test_size=test_size, seed=seed, **options)


def subset_indices(n: int, size: int | None, seed: int) -> np.ndarray | None:
    """Sorted random subset of range(n) of the given size, or None for all of it."""
    if size is None or size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# --- planted (offline, generated) ----------------------------------------------------------

@register_dataset("planted")
def _planted(*, data_dir, download, train_size, test_size, seed, num_train=2000, num_test=500,
             num_classes=10, label_noise=0.1, planted_fraction=0.1, planted_classes=(0, 1),
             noise_std=0.6, planted_strength=1.5, name="planted") -> DatasetBundle:
    num_train = train_size or num_train
    num_test = test_size or num_test
    common = dict(num_classes=num_classes, planted_fraction=planted_fraction,
                  planted_classes=tuple(planted_classes), noise_std=noise_std,
                  planted_strength=planted_strength)
    # Independent streams for the two splits; the class templates are shared.
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    train = generate_planted(num_train, label_noise=label_noise, seed=train_seed, **common)
    test = generate_planted(num_test, label_noise=0.0, seed=test_seed, **common)
    return DatasetBundle(
        name=name,
        train=ArrayDataset(train.images, train.targets),
        test=ArrayDataset(test.images, test.targets),
        num_classes=num_classes,
        class_names=planted_class_names(num_classes),
        input_shape=tuple(train.images.shape[1:]),
        train_targets=train.targets,
        ground_truth=train.ground_truth(),
        test_ground_truth=test.ground_truth(),
        options=dict(common, num_train=num_train, num_test=num_test, label_noise=label_noise,
                     seed=seed, planted_classes=list(common["planted_classes"])),
        images_fn=lambda: to_uint8(train.images),
    )


@register_dataset("planted-control")
def _planted_control(**kwargs) -> DatasetBundle:
    """`planted` without the opposing-signal feature (same classes and label noise)."""
    return _planted(**{**kwargs, "planted_fraction": 0.0, "name": "planted-control"})


# --- torchvision datasets -------------------------------------------------------------------

@dataclass(frozen=True)
class _VisionSpec:
    title: str  # for messages
    cls_name: str  # torchvision.datasets class
    folder: str  # what the user must copy into data_dir
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]


_VISION = {
    "cifar10": _VisionSpec("CIFAR-10", "CIFAR10", "cifar-10-batches-py",
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), (3, 32, 32)),
    "mnist": _VisionSpec("MNIST", "MNIST", "MNIST/raw", (0.1307,), (0.3081,), (1, 28, 28)),
    "fashion-mnist": _VisionSpec("Fashion-MNIST", "FashionMNIST", "FashionMNIST/raw",
                                 (0.2860,), (0.3530,), (1, 28, 28)),
}


def _unavailable(spec: _VisionSpec, data_dir: str, download: bool, reason: str | None):
    where = data_dir.rstrip("/") + "/"
    head = (f"{spec.title} could not be downloaded into {where} ({reason})" if download
            else f"{spec.title} not found under {where}")
    return DatasetUnavailableError(
        f"{head}. Run with --download on a machine with internet, or copy the "
        f"'{spec.folder}' folder into {where}; for an offline run use --dataset planted."
    )


def _open_vision(spec: _VisionSpec, train: bool, data_dir: str, download: bool, transform):
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls_name)
    try:
        return cls(root=data_dir, train=train, download=download, transform=transform)
    except Exception as exc:  # noqa: BLE001 - torchvision raises RuntimeError, network errors vary
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise _unavailable(spec, data_dir, download, reason) from None


def _vision_images_uint8(ds, indices: np.ndarray | None) -> np.ndarray:
    data = ds.data if isinstance(ds.data, np.ndarray) else ds.data.numpy()
    if indices is not None:
        data = data[indices]
    return data if data.ndim == 4 else data[..., None]  # MNIST: (N, H, W) -> (N, H, W, 1)


def _build_vision(key: str, *, data_dir, download, train_size, test_size, seed,
                  augment: bool = False) -> DatasetBundle:
    import torchvision.transforms as T

    spec = _VISION[key]
    normalise = [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    size = spec.input_shape[1]
    # Augmentation is off by default: per-example recordings compare the same input over time.
    train_tf = T.Compose(([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
                          if augment else []) + normalise)
    train_full = _open_vision(spec, True, data_dir, download, train_tf)
    test_full = _open_vision(spec, False, data_dir, download, T.Compose(normalise))

    train_seed, test_seed = np.random.SeedSequence(seed).generate_state(2)
    train_idx = subset_indices(len(train_full), train_size, int(train_seed))
    test_idx = subset_indices(len(test_full), test_size, int(test_seed))
    targets = np.asarray(train_full.targets, dtype=np.int64)
    if train_idx is not None:
        targets = targets[train_idx]

    def wrap(ds, idx):
        return ds if idx is None else Subset(ds, idx.tolist())

    return DatasetBundle(
        name=key,
        train=wrap(train_full, train_idx),
        test=wrap(test_full, test_idx),
        num_classes=len(train_full.classes),
        class_names=list(train_full.classes),
        input_shape=spec.input_shape,
        train_targets=targets,
        options={"train_size": train_size, "test_size": test_size, "seed": seed,
                 "augment": augment},
        images_fn=lambda: _vision_images_uint8(train_full, train_idx),
    )


def _register_vision(key: str) -> None:
    def builder(**kwargs) -> DatasetBundle:
        return _build_vision(key, **kwargs)

    builder.__doc__ = f"{_VISION[key].title} through torchvision (root=data_dir)."
    register_dataset(key)(builder)


for _key in _VISION:
    _register_vision(_key)
