"""Scoring example-dynamics statistics against planted ground truth (AUROC).

AUROC is the Mann-Whitney U statistic normalised by n_pos * n_neg: the probability that a
random positive scores higher than a random negative, ties counting one half. Computed from
average ranks, so it is O(n log n) and exact with ties.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import CLASSES, register_analysis
from .run import Run


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (infinities rank like any value)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.ones(len(xs), dtype=bool)
    new[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(xs))
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(xs))
    ranks[order] = avg[group]
    return ranks


def auroc(scores, labels, return_counts: bool = False):
    """AUROC of `scores` (higher = more likely positive) for boolean `labels`; NaN if either
    class is empty. NaN scores are dropped with a warning saying how many, since an AUROC
    over a few examples reads like one over all; `return_counts=True` also returns
    (n_scored, n_dropped)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    keep = ~np.isnan(s)
    dropped = int((~keep).sum())
    if dropped:
        import warnings

        warnings.warn(f"auroc: dropped {dropped} of {len(s)} examples whose score is NaN "
                      f"({int(y[~keep].sum())} of them positive); the AUROC is over the other "
                      f"{len(s) - dropped}", stacklevel=2)
    s, y = s[keep], y[keep]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        value = float("nan")
    else:
        r = _average_ranks(s)
        u = r[y].sum() - n_pos * (n_pos + 1) / 2.0
        value = float(u / (n_pos * n_neg))
    return (value, len(s), dropped) if return_counts else value


# name -> (analysis, variable, sign): sign -1 where a *low* value flags a mislabelled example
DETECTORS = {
    "forgetting_events": ("forgetting", "forgetting_events", 1),
    "aum": ("aum", "aum", -1),
    "confidence": ("cartography", "confidence", -1),
    "correctness": ("cartography", "correctness", -1),
    "el2n": ("el2n", "el2n", 1),
}


@register_analysis("mislabel_detection", needs=("ground_truth/is_mislabeled", "train/logits|train/token_accuracy"),
                   tasks=CLASSES)
def mislabel_detection(run: Run, source: str = "train", correct_threshold: float | None = None) -> xr.Dataset:
    """AUROC of each example-dynamics score for finding the examples whose label was flipped
    (ground_truth/is_mislabeled); forgetting counts never-learned examples as infinite."""
    from .difficulty import aum, cartography, el2n
    from .forgetting import forgetting

    truth = run.ground_truth["is_mislabeled"].values.astype(bool)
    theta = correct_threshold
    results = {"forgetting": forgetting(run, source, never_learned="inf", correct_threshold=theta),
               "aum": aum(run, source), "cartography": cartography(run, source, correct_threshold=theta),
               "el2n": el2n(run, source=source)}
    names, values, scored, dropped = [], [], [], []
    for name, (analysis, var, sign) in DETECTORS.items():
        ds = results[analysis]
        ids = ds["example"].values
        names.append(name)
        v, n, d = auroc(sign * ds[var].values, truth[ids], return_counts=True)
        values.append(v)
        scored.append(n)
        dropped.append(d + int(truth.size - len(ids)))   # examples the analysis never saw count too
    out = xr.Dataset({"auroc": ("score", np.array(values)), "n_scored": ("score", np.array(scored)),
                      "n_dropped": ("score", np.array(dropped))}, coords={"score": names})
    out.attrs.update(source=source, num_mislabeled=int(truth.sum()), num_examples=int(truth.size))
    return out


def score_opposing_groups(run: Run, groups: xr.Dataset) -> xr.Dataset:
    """Precision and recall of an `opposing_groups` result against the planted opposing
    feature (ground_truth/has_planted_feature), over the tracked probe examples.

    Precision: share of the examples placed in an opposing group that carry the planted
    feature; recall: share of tracked planted examples placed in one."""
    truth = run.ground_truth["has_planted_feature"].values.astype(bool)[groups["example_id"].values]
    det = groups["detected"].values.astype(bool)
    tp = int((det & truth).sum())
    precision = tp / det.sum() if det.sum() else float("nan")
    recall = tp / truth.sum() if truth.sum() else float("nan")
    out = xr.Dataset({"precision": precision, "recall": recall, "detected": int(det.sum()),
                      "planted": int(truth.sum()), "true_positives": tp, "tracked": int(det.size)})
    out.attrs.update(group_params=groups.attrs.get("params", {}), group_pairs=int(groups.sizes["opposition"]))
    return out


@register_analysis("opposing_detection", needs=("ground_truth/has_planted_feature", "probe/grad_proj", "probe/loss"))
def opposing_detection(run: Run, **group_params) -> xr.Dataset:
    """Precision and recall of the opposing groups (found with `group_params`, passed to
    opposing_groups) for the examples that carry the planted opposing feature."""
    from .opposing import opposing_groups

    return score_opposing_groups(run, opposing_groups(run, **group_params))
