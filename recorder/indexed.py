"""`IndexedDataset`: make any map-style dataset also return each example's index.

The recorder keys everything by example id (the index into the training set), so the batch
must carry it: wrapping the dataset is the least invasive way, and works with any DataLoader
sampler (shuffling, distributed) because the id travels with the example.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so that ``ds[i]`` returns ``(x, y, i)``.

    The wrapped dataset must return ``(x, y)``; ``len`` and attribute access (``targets``,
    ``classes``, ...) pass through to it.
    """

    def __init__(self, dataset: Dataset):
        if isinstance(dataset, IndexedDataset):
            dataset = dataset.dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "IndexedDataset needs a map-style dataset (with __getitem__ and __len__), "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError("IndexedDataset expects the wrapped dataset to return (x, y); "
                            f"got {type(item).__name__}")
        x, y = item
        return x, y, int(index)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; avoid recursion before __init__ sets `dataset`.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.dataset!r})"
