"""Example difficulty: over time, Dataset Cartography, AUM, EL2N and GraNd.

Every score is a per-example statistic of the presentations in `source`:
- ``"train"`` (default) — the training presentations: free (recorded anyway), and what the
  papers use (cartography and AUM average over training epochs); logits are from the
  forward pass before each update.
- ``"probe"`` — the probe passes over the fixed tracked subset: evaluation-mode scores at the
  same moments for every tracked example, at the cost of covering only that subset.

References: Swayamdipta et al. 2020 (cartography), Pleiss et al. 2020 (AUM), Paul et al.
2021 (EL2N, GraNd; GraNd here is the recorded per-example gradient norm of this one run,
not an expectation over initialisations).

On sequence runs the scores are per-sequence token statistics (analysis.sequence_runs):
confidence is the mean target-token probability, AUM the mean token margin, EL2N the mean
token EL2N, and "correct" is token accuracy >= `correct_threshold`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from . import blockwise, sequence_runs
from .registry import CLASSES, register_analysis
from .run import Run
from .sequences import Sequences, gather, per_example, time_table


def _mean_std(seq: Sequences, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and population std (ddof=0), two-pass for accuracy."""
    ok = ~np.isnan(values)
    idx, v = seq.index[ok], values[ok].astype(np.float64)
    n = np.bincount(idx, minlength=seq.num_examples)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(idx, weights=v, minlength=seq.num_examples) / n
        var = np.bincount(idx, weights=(v - mean[idx]) ** 2, minlength=seq.num_examples) / n
    return mean, np.sqrt(var)


@register_analysis("cartography", needs=("train/logits|train/token_accuracy",), tasks=CLASSES)
def cartography(run: Run, source: str = "train", correct_threshold: float | None = None) -> xr.Dataset:
    """Dataset Cartography: confidence (mean gold-label probability over presentations),
    variability (its population std) and correctness (fraction correct)."""
    theta = sequence_runs.threshold(run, correct_threshold)
    if source == "train":   # streamed over step blocks: memory set by the number of examples
        seq, m = blockwise.moments(run, ("p_gold", "correct"), std=("p_gold",), theta=theta)
        conf, var, corr, counts = m["mean_p_gold"], m["std_p_gold"], m["mean_correct"], m["presentations"]
    else:
        seq = gather(run, source, scores=("p_gold", "correct"), correct_threshold=correct_threshold)
        conf, var = _mean_std(seq, seq.scores["p_gold"])
        corr, _ = _mean_std(seq, seq.scores["correct"])
        counts = seq.counts()
    ds = per_example(seq, {"confidence": conf, "variability": var, "correctness": corr,
                           "presentations": counts})
    ds["confidence"].attrs["long_name"] = "mean gold-label probability over presentations"
    ds["variability"].attrs["long_name"] = "std (ddof=0) of the gold-label probability"
    ds["correctness"].attrs["long_name"] = "fraction of presentations classified correctly"
    ds.attrs.update(sequence_runs.describe(sequence_runs.threshold(run, correct_threshold)))
    return ds


@register_analysis("aum", needs=("train/logits|train/token_accuracy",), tasks=CLASSES)
def aum(run: Run, source: str = "train") -> xr.Dataset:
    """Area Under the Margin: gold logit minus the largest other logit, averaged over
    presentations (low or negative: likely mislabelled)."""
    if source == "train":   # streamed over step blocks
        seq, m = blockwise.moments(run, ("margin",), theta=sequence_runs.threshold(run, None))
        mean, counts = m["mean_margin"], m["presentations"]
    else:
        seq = gather(run, source, scores=("margin",))
        mean, _ = _mean_std(seq, seq.scores["margin"])
        counts = seq.counts()
    ds = per_example(seq, {"aum": mean, "presentations": counts})
    ds["aum"].attrs["long_name"] = "mean margin (gold logit - largest other logit)"
    return ds


def _at_step(seq: Sequences, name: str, step: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Each example's score at its latest presentation at or before train step `step`
    (the end of training when None); also the step it came from (NaN if none)."""
    values = seq.scores[name]
    ok = ~np.isnan(values)
    if step is not None:
        ok &= seq.step <= step
    hits = np.flatnonzero(ok)
    idx = seq.index[hits]
    last = np.ones(len(idx), dtype=bool)
    last[:-1] = idx[1:] != idx[:-1]  # sorted by (example, time): last occurrence
    score = np.full(seq.num_examples, np.nan)
    at = np.full(seq.num_examples, np.nan)
    score[idx[last]] = values[hits[last]]
    at[idx[last]] = seq.step[hits[last]]
    return score, at


def _probe_at(run: Run, step: int | None, probe: int | None) -> int:
    steps = run.probe["step"].values
    if probe is not None:
        if not -len(steps) <= probe < len(steps):
            raise ValueError(f"probe={probe} out of range: the run has {len(steps)} probe passes")
        return probe % len(steps)
    if step is None:
        return len(steps) - 1
    before = np.flatnonzero(steps <= step)
    if not len(before):
        raise ValueError(f"no probe pass at or before step {step} (first at step {steps.min()})")
    return int(before[-1])


def _score_at(run: Run, name: str, var: str, step, source: str, probe) -> xr.Dataset:
    if source == "probe":
        k = _probe_at(run, step, probe)
        seq = gather(run, "probe", scores=(name,))
        keep = seq.time == k
        score = np.full(seq.num_examples, np.nan)
        score[seq.index[keep]] = seq.scores[name][keep]
        at = np.full(seq.num_examples, float(run.probe["step"].values[k]))
        attrs = {"probe": k, "step": int(run.probe["step"].values[k])}
    else:
        if source != "train":
            raise ValueError(f"source must be 'train' or 'probe', got {source!r}")
        seq, score, at = blockwise.latest(run, name, step, sequence_runs.threshold(run, None))   # streamed
        attrs = {"step": -1 if step is None else int(step)}
    return per_example(seq, {var: score, "score_step": at}, attrs)


@register_analysis("el2n", needs=("train/logits|train/token_accuracy",), tasks=CLASSES)
def el2n(run: Run, step: int | None = None, source: str = "train", probe: int | None = None) -> xr.Dataset:
    """EL2N: ||softmax(logits) - onehot(target)||_2 at a training step (train source: each
    example's latest presentation at or before `step`; probe source: the last probe pass at or
    before `step`, or probe index `probe`). `step=None` means the end of training."""
    ds = _score_at(run, "el2n", "el2n", step, source, probe)
    ds["el2n"].attrs["long_name"] = "L2 norm of the error vector softmax - onehot"
    return ds


@register_analysis("grand", needs=("train/grad_norm",))
def grand(run: Run, step: int | None = None, source: str = "train", probe: int | None = None) -> xr.Dataset:
    """GraNd: the recorded per-example gradient norm at a step (same selection as `el2n`)."""
    ds = _score_at(run, "grad_norm", "grand", step, source, probe)
    ds["grand"].attrs["long_name"] = "per-example loss-gradient norm (recorded grad_norm)"
    return ds


@register_analysis("difficulty", needs=("train/logits|train/token_accuracy",), tasks=CLASSES)
def difficulty(run: Run, source: str = "train", correct_threshold: float | None = None) -> xr.Dataset:
    """Difficulty over time: per (epoch or probe, example) mean loss and 1 - p(gold), plus the
    per-class and overall means (the average over examples of the per-example values;
    sequence runs have no classes, only the overall means)."""
    theta = sequence_runs.threshold(run, correct_threshold)
    by = "epoch" if source == "train" else "probe"
    if source == "train":   # streamed over step blocks: memory set by examples x epochs (the result)
        seq, bins, t = blockwise.epoch_tables(run, ("loss", "p_gold", "correct"), theta,
                                              transform={"p_gold": lambda m: 1 - m})
        loss, diff, ok = t["loss"], t["p_gold"], t["correct"]
    else:
        seq = gather(run, source, scores=("loss", "p_gold", "correct"), correct_threshold=correct_threshold)
        bins, loss = time_table(seq, seq.scores["loss"], by)
        _, pg = time_table(seq, seq.scores["p_gold"], by)
        _, ok = time_table(seq, seq.scores["correct"], by)
        diff = 1 - pg
    dims = (by, "example")
    ds = xr.Dataset({"loss": (dims, loss.astype(np.float32, copy=False)),
                     "difficulty": (dims, diff.astype(np.float32, copy=False)),
                     "accuracy": (dims, ok.astype(np.float32, copy=False))},
                    coords={by: bins, "example": seq.examples, "target": ("example", seq.target)})
    if by == "probe":
        ds = ds.assign_coords(step=("probe", run.probe["step"].values[bins]),
                              epoch=("probe", run.probe["epoch"].values[bins]))
    ds.attrs.update(source=source, **sequence_runs.describe(theta))
    if theta is not None:   # the "classes" of a sequence run are its vocabulary: no class tables
        for var in ("loss", "difficulty", "accuracy"):
            ds[f"mean_{var}"] = (by, _by_rows(ds[var].values, lambda v: np.nanmean(v, axis=1)).astype(np.float32))
        ds["difficulty"].attrs["long_name"] = "1 - mean target-token probability"
        return ds
    classes = np.arange(run.num_classes or int(seq.target.max()) + 1)
    onehot = (seq.target[:, None] == classes[None, :]).astype(np.float64)  # (E, K)

    def class_and_mean(rows: np.ndarray) -> np.ndarray:
        vals = rows.astype(np.float64)
        have = ~np.isnan(vals)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = (np.where(have, vals, 0) @ onehot) / (have @ onehot)
        return np.concatenate([per_class, np.nanmean(np.where(have, vals, np.nan), axis=1)[:, None]], axis=1)

    for var in ("loss", "difficulty", "accuracy"):
        both = _by_rows(ds[var].values, class_and_mean)
        ds[f"class_{var}"] = ((by, "class_id"), both[:, :-1].astype(np.float32))
        ds[f"mean_{var}"] = (by, both[:, -1].astype(np.float32))
    names = run.class_names
    ds = ds.assign_coords(class_id=classes,
                          class_name=("class_id", [names[c] if c < len(names) else str(c) for c in classes]))
    ds["difficulty"].attrs["long_name"] = "1 - p(gold label), mean over the epoch's presentations"
    ds.attrs["source"] = source
    return ds


ROW_CELLS = 1 << 19   # values per group of rows in the class tables (4 MB of float64)


def _by_rows(table: np.ndarray, func) -> np.ndarray:
    """`func` of groups of whole rows of `table`, stacked: its float64 temporaries stay at
    about `ROW_CELLS` values instead of the size of the (epoch x example) table. Every function
    used here reduces each row on its own, so the result does not depend on the grouping."""
    step = max(1, ROW_CELLS // max(1, table.shape[1]))
    parts = [func(table[s:s + step]) for s in range(0, len(table), step)]
    return np.concatenate(parts) if parts else func(table)
