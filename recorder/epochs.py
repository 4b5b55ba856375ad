"""Which epoch a training batch belongs to.

Given by the loop (`rec.step(..., epoch=e)` or `rec.epoch = e`) it is used as is. Otherwise
it is inferred: an epoch ends when a batch repeats an example id already seen in it. That is
exact for any loader that visits each example at most once per epoch, shuffled or not,
`drop_last` or not (the first batch of the next epoch must overlap the last one's examples).
It is ambiguous when epochs visit a subset (a sampler over part of the data, one DDP rank)
or sample with replacement: then a warning says so, once, and asks for `epoch=`.
"""
from __future__ import annotations

import warnings

import numpy as np


class EpochTracker:
    def __init__(self, num_examples: int | None):
        self.num_examples = num_examples
        self.seen = np.zeros(num_examples or 0, dtype=bool)
        self.count = 0            # distinct examples seen in the current epoch
        self.epoch = 0
        self.source: str | None = None   # "loop" or "inferred" (stored in root attrs)
        self._warned = False

    def next(self, ids: np.ndarray, given: int | None) -> int:
        self._grow(int(ids.max()) + 1)
        seen = self.seen[ids]     # one gather serves the overlap test and the new-example count
        if given is not None:
            given = int(given)
            if given != self.epoch:
                self._reset()
                seen = None
            self.epoch = given
            self.source = "loop" if self.source in (None, "loop") else "mixed"
        elif seen.any():
            self._check_complete(len(ids))
            self._reset()
            seen = None
            self.epoch += 1
            self.source = "inferred" if self.source in (None, "inferred") else "mixed"
        elif self.source is None:
            self.source = "inferred"
        self.count += len(ids) if seen is None else len(ids) - int(np.count_nonzero(seen))
        self.seen[ids] = True
        return self.epoch

    def _grow(self, hi: int) -> None:
        if hi > len(self.seen):
            self.seen = np.concatenate([self.seen, np.zeros(max(hi - len(self.seen), len(self.seen)), bool)])

    def _mark(self, ids: np.ndarray) -> None:
        self._grow(int(ids.max()) + 1)
        self.count += int((~self.seen[ids]).sum())
        self.seen[ids] = True

    def _reset(self) -> None:
        self.seen[:] = False
        self.count = 0

    def _check_complete(self, batch: int) -> None:
        n = self.num_examples
        if self._warned or n is None or n - self.count < batch:
            return
        self._warned = True
        warnings.warn(f"epoch {self.epoch} was inferred to end after {self.count} of {n} examples (a batch "
                      f"repeated an example id); with a sampler over a subset, sampling with replacement or "
                      f"one DDP rank the inferred epochs can be wrong: pass epoch= to rec.step() or set "
                      f"rec.epoch", stacklevel=4)

    def state(self) -> dict:
        return {"seen": np.flatnonzero(self.seen), "epoch": self.epoch, "source": self.source,
                "warned": self._warned}

    def load(self, state: dict) -> None:
        self._reset()
        ids = np.asarray(state["seen"], dtype=np.int64)
        if len(ids):
            self._mark(ids)
        self.epoch, self.source, self._warned = int(state["epoch"]), state.get("source"), bool(state.get("warned"))
