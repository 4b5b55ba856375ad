"""Input checks at the API boundary, so mistakes surface as one clear sentence in the
user's own frame instead of a traceback from numpy or zarr later in the writer thread."""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a tensor or array, got {type(value).__name__} ({e})") from None


def check_example_ids(example_ids, num_examples: int | None) -> torch.Tensor:
    """Example ids: 1-D integers in [0, num_examples). Returned as a CPU int64 tensor."""
    ids = _as_tensor(example_ids, "example_ids")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"example_ids must be integers, got dtype {ids.dtype}; pass the dataset indices "
                        f"(wrap your dataset in recorder.IndexedDataset to get them from the loader)")
    if ids.dim() != 1:
        raise ValueError(f"example_ids must be 1-D (one id per example), got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("example_ids is empty; a recorded batch needs at least one example")
    ids = ids.detach().to("cpu", torch.int64)
    # one sort gives the range and every duplicate (adjacent equal values): a few µs,
    # half of torch.unique, and no second pass over the ids
    ordered = np.sort(ids.numpy())
    lo, hi = int(ordered[0]), int(ordered[-1])
    if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
        uniq, counts = np.unique(ordered, return_counts=True)
        raise ValueError(f"example_ids repeat within one batch ({len(ids) - len(uniq)} duplicates, e.g. id "
                         f"{int(uniq[counts > 1][0])}); each example may appear once per batch, or its statistics are "
                         f"double-counted. Deduplicate the batch (repeated-augmentation samplers: record "
                         f"one view per example)")
    if lo < 0:
        raise ValueError(f"example_ids must be >= 0, got {lo}")
    if num_examples is not None and hi >= num_examples:
        raise ValueError(f"example id {hi} is out of range for num_examples={num_examples}; "
                         f"ids must be dataset indices in [0, {num_examples}). If the loader's dataset is a "
                         f"Subset or random_split part of a larger indexed dataset, its ids index that larger "
                         f"dataset: pass num_examples=len(larger dataset), or wrap the part itself in "
                         f"IndexedDataset(part) to get ids 0..len(part)-1")
    return ids


def check_targets(targets, n: int, num_classes: int | None) -> torch.Tensor:
    t = _as_tensor(targets, "targets")
    if t.shape[0] != n:
        raise ValueError(f"targets has {t.shape[0]} rows but example_ids has {n}; pass one target per example")
    if num_classes is not None:
        if t.dim() != 1:
            raise ValueError(f"classification targets must be 1-D class indices, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise TypeError(f"classification targets must be integer class indices, got {t.dtype}; "
                            f"omit num_classes to record a regression run")
        if t.device.type == "cpu" and t.numel():
            lo, hi = (int(v) for v in torch.aminmax(t))   # one pass, not min() then max()
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"targets must be in [0, {num_classes}); got [{lo}, {hi}]")
    return t


def check_losses(losses, n: int) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a torch.Tensor of per-example losses, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] != n:
        hint = " (use reduction='none')" if losses.dim() == 0 else ""
        raise ValueError(f"losses must have shape ({n},), one per example in the batch; "
                         f"got {tuple(losses.shape)}{hint}")
    return losses


def check_logits(logits, n: int, num_classes: int | None) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"logits must have shape ({n}, num_classes) to match the {n} example ids; "
                         f"got {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} classes but the Recorder was given "
                         f"num_classes={num_classes}")
    return logits


def close_names(wanted: str, names, n: int = 5) -> list[str]:
    import difflib

    return difflib.get_close_matches(wanted, list(names), n=n, cutoff=0.5)


def check_patterns_match(patterns, names, what: str) -> None:
    """Every name/fnmatch pattern must select at least one of `names`, else one error naming
    the close ones: a misspelt layer would otherwise record nothing (norms of 0)."""
    import fnmatch

    names = list(names)
    for p in patterns or ():
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            close = close_names(p, names) or names[:8]
            raise ValueError(f"{what}: {p!r} matches no module of the model; close names: {close}")
