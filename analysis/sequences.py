"""Per-presentation scores gathered into per-example sequences, for the example-dynamics
analyses (forgetting, cartography, AUM, EL2N, loss changes).

Scores that need the logits (correctness, gold-label probability, margin, EL2N) are computed
block by block over the row dimension, so the (rows, slots, classes) logits are never held in
memory at once; only one float per presentation is kept. The presentations are then sorted
by (example, time) once (a stable sort by example of a row-major table), which turns every
per-example question into a segmented numpy operation: no Python loop over examples.

Sources:
- ``"train"``: every training presentation, ordered by step; logits come from the training
  forward pass, i.e. before that step's update (docs/STORE.md).
- ``"probe"``: the probe passes over the fixed tracked subset, ordered by probe.

Sequence (language-model) runs store per-sequence token statistics instead of logits; their
scores are defined in `analysis.sequence_runs` ("correct" = token accuracy >= θ).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from . import sequence_runs
from .run import Run

SCORES = ("correct", "p_gold", "margin", "el2n", "loss", "grad_norm")
BLOCK_BYTES = 64 * 2**20  # logits loaded per block


@dataclass
class Sequences:
    """Presentations sorted by (example, time). `index` maps each to its example's position
    in `examples`; `starts` marks each example's first presentation."""

    source: str
    examples: np.ndarray            # (E,) example ids, ascending
    index: np.ndarray               # (P,) position of each presentation's example in `examples`
    step: np.ndarray                # (P,) train rows recorded before the presentation
    epoch: np.ndarray               # (P,)
    time: np.ndarray                # (P,) train step, or probe index
    target: np.ndarray              # (E,) label of each example (as the model saw it)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def starts(self) -> np.ndarray:
        first = np.ones(len(self.index), dtype=bool)
        first[1:] = self.index[1:] != self.index[:-1]
        return first

    def counts(self) -> np.ndarray:
        return np.bincount(self.index, minlength=self.num_examples)

    def segment_sum(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.index, weights=values, minlength=self.num_examples)

    def segment_mean(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.segment_sum(values) / self.counts()


def logit_scores(logits: np.ndarray, target: np.ndarray, names=SCORES) -> dict[str, np.ndarray]:
    """Scores of each row of `logits` (..., C) against integer `target` (...). Rows with any
    NaN logit or a negative target (padding) get NaN."""
    valid = (target >= 0) & ~np.isnan(logits).any(-1)
    z = np.where(valid[..., None], logits, 0.0).astype(np.float64)
    t = np.where(valid, target, 0).astype(np.int64)[..., None]
    gold = np.take_along_axis(z, t, -1)[..., 0]
    out: dict[str, np.ndarray] = {}
    if "correct" in names:
        out["correct"] = np.where(valid, z.argmax(-1) == t[..., 0], np.nan)
    if "margin" in names:
        others = z.copy()
        np.put_along_axis(others, t, -np.inf, -1)
        out["margin"] = np.where(valid, gold - others.max(-1), np.nan)
    if "p_gold" in names or "el2n" in names:
        e = np.exp(z - z.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        pg = np.take_along_axis(p, t, -1)[..., 0]
        if "p_gold" in names:
            out["p_gold"] = np.where(valid, pg, np.nan)
        if "el2n" in names:
            # ||p - onehot||^2 = sum p^2 - 2 p_gold + 1
            sq = np.maximum((p * p).sum(-1) - 2 * pg + 1, 0)
            out["el2n"] = np.where(valid, np.sqrt(sq), np.nan)
    return {k: v.astype(np.float32) for k, v in out.items()}


def _blockwise(ds: xr.Dataset, row: str, target: np.ndarray, names, theta=None) -> dict[str, np.ndarray]:
    """Logit scores over the whole table, loading `BLOCK_BYTES` of logits at a time."""
    if theta is not None:
        return sequence_runs.scores(ds, names, theta)
    logit_names = [n for n in names if n in ("correct", "p_gold", "margin", "el2n")]
    out = {n: ds[n].values.astype(np.float32) for n in names if n in ("loss", "grad_norm")}
    if not logit_names:
        return out
    if "logits" not in ds:
        raise ValueError(f"these scores need logits, which this run did not record: {logit_names}; "
                         f"record them with step.record(losses=..., logits=...)")
    logits = ds["logits"]
    rows = logits.sizes[row]
    per_row = max(1, int(np.prod([s for d, s in logits.sizes.items() if d != row])) * 4)
    block = max(1, BLOCK_BYTES // per_row)
    parts: dict[str, list] = {n: [] for n in logit_names}
    for start in range(0, rows, block):
        sl = slice(start, min(rows, start + block))
        lg = logits.isel({row: sl}).transpose(row, ..., "class").values
        tg = target[sl] if target.ndim == lg.ndim - 1 else np.broadcast_to(target, lg.shape[:-1])
        for n, v in logit_scores(lg, tg, logit_names).items():
            parts[n].append(v)
    for n in logit_names:
        out[n] = np.concatenate(parts[n]) if parts[n] else np.zeros((0,) + logits.shape[1:-1], np.float32)
    return out


def gather(run: Run, source: str = "train", scores=SCORES, correct_threshold: float | None = None) -> Sequences:
    """Every presentation of every example from `source` ("train" or "probe"), with `scores`.
    `correct_threshold` (θ) defines "correct" on sequence runs (token accuracy >= θ)."""
    theta = sequence_runs.threshold(run, correct_threshold)
    if source == "train":
        return _gather_train(run, scores, theta)
    if source == "probe":
        return _gather_probe(run, scores, theta)
    raise ValueError(f"source must be 'train' or 'probe', got {source!r}")


def _available(ds: xr.Dataset, scores, theta=None) -> list[str]:
    need_logits = {"correct", "p_gold", "margin", "el2n"}
    missing = [s for s in scores if s == "grad_norm" and "grad_norm" not in ds]
    if missing:
        raise ValueError("this run recorded no per-example gradient norms (grad_norm); record "
                         "them with the gradient extension (Recorder(..., grad_norms=True))")
    if theta is not None:
        need_logits = set(sequence_runs.STORED) | {"correct"}
    return [s for s in scores if s in ds or s in need_logits]


def _class_targets(ds: xr.Dataset) -> bool:
    """Whether the group's targets are class labels (regression and token targets are not:
    their examples carry target -1 here, never a truncated float)."""
    return "target" in ds and np.issubdtype(ds["target"].dtype, np.integer)


def _gather_train(run: Run, scores, theta=None) -> Sequences:
    train = run.train
    scores = _available(train, scores, theta)
    ids = train["example_id"].values
    target = train["target"].values if _class_targets(train) else np.full(ids.shape, -1)
    cells = _blockwise(train, "step", target, scores, theta)
    cell, examples, index, step = sort_table(ids)
    epoch = train["epoch"].values.astype(np.int64)[step] if "epoch" in train else np.zeros_like(step)
    tgt = np.full(len(examples), -1, dtype=np.int64)
    tgt[index] = target.ravel()[cell]
    vals = {k: v.ravel()[cell] for k, v in cells.items()}
    return Sequences("train", examples, index, step, epoch, step, tgt, vals)


def sort_table(ids: np.ndarray):
    """Sort the valid cells of a (step, slot) example-id table by (example, step).

    Sorting the values of one int64 key, example * cells + cell, is ~4x faster than a stable
    argsort by example (measured at 10M presentations) and needs no stability.
    Returns (raveled cell index of each presentation, example ids, per-presentation position
    of its example in those ids, per-presentation step)."""
    size = ids.size
    cells = np.flatnonzero(ids.ravel() >= 0)
    key = ids.ravel()[cells] * size + cells
    del cells
    key.sort()
    ex = key // size
    key -= ex * size  # now the cell index, in (example, step, slot) order
    new = np.ones(len(ex), dtype=bool)
    new[1:] = ex[1:] != ex[:-1]
    examples = ex[new]
    index = np.cumsum(new) - 1
    return key, examples, index, key // ids.shape[1]


def _gather_probe(run: Run, scores, theta=None) -> Sequences:
    if not run.has("probe") or not run.probe.sizes.get("probe", 0):
        raise ValueError("this run has no probe passes; use source='train' or record rec.probe(...)")
    p = run.probe
    scores = _available(p, scores, theta)
    target = p["target"].values if _class_targets(p) else np.full(p.sizes["example"], -1)
    cells = _blockwise(p.transpose("probe", "example", ...), "probe", target, scores, theta)
    n_probe, n_ex = p.sizes["probe"], p.sizes["example"]
    examples = p["example_id"].values.astype(np.int64)
    index = np.repeat(np.arange(n_ex), n_probe)
    probe_idx = np.tile(np.arange(n_probe), n_ex)
    vals = {k: np.ascontiguousarray(v.T).ravel() for k, v in cells.items()}  # (example, probe)
    step = p["step"].values.astype(np.int64)[probe_idx]
    epoch = p["epoch"].values.astype(np.int64)[probe_idx]
    order = np.argsort(examples, kind="stable")
    if not np.all(order == np.arange(n_ex)):  # STORE.md promises ascending ids; be safe
        perm = (order[:, None] * n_probe + np.arange(n_probe)).ravel()
        examples, target = examples[order], target[order]
        vals = {k: v[perm] for k, v in vals.items()}
    return Sequences("probe", examples, index, step, epoch, probe_idx.astype(np.int64),
                     target.astype(np.int64), vals)


def per_example(seq: Sequences, data: dict, attrs: dict | None = None) -> xr.Dataset:
    """A Dataset indexed by `example` (coordinate = example id) with the example's label."""
    ds = xr.Dataset({k: ("example", np.asarray(v)) for k, v in data.items()},
                    coords={"example": seq.examples, "target": ("example", seq.target)})
    ds.attrs.update({"source": seq.source, **(attrs or {})})
    return ds


def time_table(seq: Sequences, values: np.ndarray, by: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
    """Mean of `values` per (time bin, example): bins are epochs, or probes for a probe source.
    Returns (bins, table of shape (bins, examples)) with NaN where an example had no presentation."""
    key = seq.epoch if by == "epoch" else seq.time
    bins, binv = np.unique(key, return_inverse=True)
    flat = binv * seq.num_examples + seq.index
    size = len(bins) * seq.num_examples
    ok = ~np.isnan(values)
    total = np.bincount(flat[ok], weights=values[ok], minlength=size)
    count = np.bincount(flat[ok], minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = (total / count).reshape(len(bins), seq.num_examples)
    return bins, table
