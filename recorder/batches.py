"""Batches as people write them: `(x, y, ids)` tuples, or dicts from Hugging Face
collators with the example index under a key the user names; model outputs as a tensor, a
dict with "logits", or an object with `.logits` (HF `ModelOutput`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEFAULT_IDS_KEY = "example_id"
DEFAULT_TARGETS_KEY = "labels"


@dataclass
class Batch:
    inputs: object          # a tensor (tuple batches) or a dict of model keyword arguments
    targets: object
    example_ids: object
    attention_mask: object = None


def unpack(batch, kind: str, ids_key: str = DEFAULT_IDS_KEY, targets_key: str = DEFAULT_TARGETS_KEY) -> Batch:
    """Split a loader's batch into model inputs, targets and example ids."""
    if isinstance(batch, Mapping):
        missing = [k for k in (ids_key, targets_key) if k not in batch]
        if missing:
            raise ValueError(f"the {kind} loader yields dict batches without {missing} (keys: {sorted(batch)}); "
                             f"name the keys with ids_key=/targets_key=, or add the index with "
                             f"IndexedDataset(dataset, key={ids_key!r})")
        inputs = {k: v for k, v in batch.items() if k not in (ids_key, targets_key)}
        return Batch(inputs, batch[targets_key], batch[ids_key], batch.get("attention_mask"))
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return Batch(*batch)
    what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ValueError(f"{kind} loaders must yield (inputs, targets, example_ids) or a dict with "
                     f"{ids_key!r} and {targets_key!r}; got {what}. Wrap the dataset in recorder.IndexedDataset")


def to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def call_model(model, inputs):
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def output_logits(out) -> torch.Tensor:
    """The logits of a model output: a tensor, out["logits"], out.logits, or out[0]."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}; return a tensor, "
                    f"a dict with 'logits' or an object with .logits, or pass loss_fn working on it")
