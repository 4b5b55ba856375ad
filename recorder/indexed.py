"""`IndexedDataset`: make any map-style dataset also return each example's index.

The recorder keys everything by example id (the index into the training set), so the batch
must carry it: wrapping the dataset is the least invasive way, and works with any DataLoader
sampler (shuffling, distributed) because the id travels with the example.

Which index: by default the position in the dataset you wrap (``ids="position"``), so
``num_examples=len(wrapped)`` and ids are ``0 .. len-1`` whatever lies underneath, including
a `Subset` or a `random_split` part. ``ids="base"`` maps positions through every `Subset`
(and through an inner `IndexedDataset`) to the index of the innermost dataset, for when
several splits of one dataset should share ids; then ``num_examples`` is that dataset's
length. Wrapping a `Subset` of an `IndexedDataset` again is fine: the inner id is replaced
by the outer one (or kept, with ``ids="base"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

__all__ = ["IndexedDataset"]

IDS = ("position", "base")


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that ``ds[i]`` returns ``(x, y, i)`` — or, for datasets
    whose items are dicts (Hugging Face style), the dict with ``key: i`` added.

    ids: "position" (index into this dataset) or "base" (index into the innermost dataset
    under any `Subset` / `random_split`). ``len`` and attribute access (``targets``,
    ``classes``, ...) pass through to the wrapped dataset.
    """

    def __init__(self, dataset: Dataset, key: str = "example_id", ids: str = "position"):
        if ids not in IDS:
            raise ValueError(f"IndexedDataset ids must be one of {IDS}, got {ids!r}")
        if isinstance(dataset, IndexedDataset):
            dataset = dataset.dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "IndexedDataset needs a map-style dataset (with __getitem__ and __len__), "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.key = key
        self.ids = ids
        self._inner = _inner_indexed(dataset)   # an IndexedDataset under Subsets, if any
        self._base = _base_indices(dataset) if ids == "base" else None

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def base_indices(self) -> np.ndarray:
        """Index into the innermost dataset of each position (identity without Subsets)."""
        return _base_indices(self.dataset)

    def example_id(self, index: int) -> int:
        return int(self._base[index]) if self._base is not None else int(index)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        i = self.example_id(index)
        if isinstance(item, Mapping):
            out = dict(item)
            out[self.key] = i
            return out
        if not isinstance(item, (tuple, list)):
            raise TypeError("IndexedDataset expects the wrapped dataset to return (x, y) or a dict; "
                            f"got {type(item).__name__}")
        if len(item) == 3 and self._inner is not None:
            item = item[:2]   # the inner IndexedDataset's id; this wrapper's id replaces it
        if len(item) != 2:
            raise TypeError(f"IndexedDataset expects the wrapped dataset to return (x, y); got a "
                            f"{type(item).__name__} of {len(item)}. Return (x, y) or a dict")
        x, y = item
        return x, y, i

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; avoid recursion before __init__ sets `dataset`.
        if name in ("dataset", "_inner", "_base", "key", "ids"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"


def _inner_indexed(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, IndexedDataset) else None


def _base_indices(dataset) -> np.ndarray:
    """Positions of `dataset` mapped through nested Subsets (and inner IndexedDatasets)."""
    idx = np.arange(len(dataset))
    while True:
        if isinstance(dataset, Subset):
            idx = np.asarray(dataset.indices)[idx]
            dataset = dataset.dataset
        elif isinstance(dataset, IndexedDataset):
            dataset = dataset.dataset
        else:
            return idx
