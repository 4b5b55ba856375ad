"""Flatten the (step, slot) training table into one row per presentation of an example.

Many analyses (forgetting, per-example trajectories, loss changes) need an example's
presentations in order. Sorting once by (example_id, step) turns every per-example
question into a segmented operation on flat arrays — no Python loop over examples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from .run import Run


@dataclass
class Presentations:
    """Valid (non-padding) presentations, sorted by (example_id, step)."""

    example_id: np.ndarray   # (P,) int64
    step: np.ndarray         # (P,) int64
    slot: np.ndarray         # (P,) int64
    epoch: np.ndarray        # (P,) int64
    target: np.ndarray       # (P,)
    loss: np.ndarray         # (P,) float32
    logits: np.ndarray | None  # (P, C) float32, when recorded

    @property
    def starts(self) -> np.ndarray:
        """Boolean (P,): True at each example's first presentation."""
        first = np.ones(len(self.example_id), dtype=bool)
        first[1:] = self.example_id[1:] != self.example_id[:-1]
        return first

    def correct(self) -> np.ndarray:
        if self.logits is None:
            raise ValueError("this run recorded no logits; correctness needs step.record(logits=...)")
        return self.logits.argmax(1) == self.target


def train_presentations(run: Run, with_logits: bool = True) -> Presentations:
    """Gather every training presentation of the run (loads the train table into memory)."""
    train = run.train
    ids = train["example_id"].values
    valid = ids >= 0
    step_idx, slot_idx = np.nonzero(valid)
    ex = ids[valid]
    order = np.lexsort((step_idx, ex))
    epoch = train["epoch"].values[step_idx] if "epoch" in train else np.zeros_like(step_idx)
    logits = None
    if with_logits and "logits" in train:
        logits = train["logits"].values[valid][order]
    target = train["target"].values[valid][order] if "target" in train else np.full(len(ex), -1)
    return Presentations(example_id=ex[order], step=step_idx[order].astype(np.int64),
                         slot=slot_idx[order].astype(np.int64), epoch=epoch[order].astype(np.int64),
                         target=target, loss=train["loss"].values[valid][order], logits=logits)


def valid_mask(train: xr.Dataset) -> xr.DataArray:
    """True where a (step, slot) cell holds a real example (not padding)."""
    return train["example_id"] >= 0
