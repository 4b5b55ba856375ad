"""Opposing gradient pairs of a recorded run, per probe pass (all tracked examples against
each other) or per training step (within the batch), with counts over time and a
class-pair matrix.

A pair {a, b} is *opposing* when cos(g_a, g_b) <= cos_threshold, its magnitudes are within
a factor `magnitude_ratio` (max/min <= magnitude_ratio: both pull comparably, so neither is
a negligible nudge against the other), optionally the classes differ, and b is among a's
`top_k` most negative partners or a among b's. Within training batches and across a probe
pass cosines come from the exact Gram when it was recorded; otherwise from the stored
sketch, whose error sd at true cosine c is about c0 (1 - c^2) (c0 = c/sqrt(K) in the store's
metadata): each pair carries that sd, and `margin` z keeps a pair only when
cos + z sd <= cos_threshold. Magnitudes from the exact `grad_norm`.
"""
from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ..checks import check_range
from ..registry import register_analysis
from ..run import Run
from .data import (Dropped, class_names, gradient_group, num_classes, probe_gram_slice, probe_slice,
                   probe_times, sketch_error, train_chunks, train_gram_chunks, use_gram)
from .topk import most_negative_pairs, within_batch_pairs, within_batch_pairs_from_cosines


def margin_threshold(threshold: float | None, margin: float, c0: float) -> float | None:
    """The cosine c* with c* + margin * c0 (1 - c*^2) = threshold: since the left side grows
    with c (while 2 margin c0 < 1), "cos + z sd <= threshold" is "cos <= c*"."""
    a = margin * c0
    if threshold is None or a == 0:
        return threshold
    if a < 0 or 2 * a >= 1:
        raise ValueError(f"margin must be >= 0 and small against 1/(2 c0) = {1 / (2 * c0):.1f}, got {margin}")
    return float((1 - np.sqrt(1 - 4 * a * (threshold - a))) / (2 * a))


def _probe_pairs(run, ds, probes, kw, block, dropped, gram=False):
    ids = np.asarray(ds["example_id"].values)
    tgt = np.asarray(ds["target"].values)
    rows = []
    for p in probe_times(ds, probes):
        if gram:   # all N x N cosines exact: the in-batch selection with one "batch"
            C, valid, mag = probe_gram_slice(ds, int(p))
            dropped.add(valid, np.ones(len(valid), bool))
            _, a, b, c = within_batch_pairs_from_cosines(
                C[None], valid[None], k=kw["top_k"], threshold=kw["effective_threshold"],
                labels=tgt[None] if kw["cross_class"] else None, norms=mag[None],
                magnitude_ratio=kw["magnitude_ratio"])
            rows.append(dict(time=np.full(len(a), p), a=ids[a], b=ids[b], ta=tgt[a], tb=tgt[b],
                             cos=c, na=mag[a], nb=mag[b]))
            continue
        G, mag = probe_slice(ds, int(p))
        nrm = np.linalg.norm(G, axis=1)
        dropped.add(np.isfinite(nrm) & (nrm > 0), np.ones(len(G), bool))
        res = most_negative_pairs(G, k=kw["top_k"], block=block, threshold=kw["effective_threshold"],
                                  labels=tgt if kw["cross_class"] else None, norms=mag,
                                  magnitude_ratio=kw["magnitude_ratio"])
        rows.append(dict(time=np.full(len(res), p), a=ids[res.a], b=ids[res.b], ta=tgt[res.a],
                         tb=tgt[res.b], cos=res.cosine, na=mag[res.a], nb=mag[res.b]))
    return rows


def _train_pairs(ds, steps, kw, gram, dropped):
    rows = []
    opts = dict(k=kw["top_k"], threshold=kw["effective_threshold"], magnitude_ratio=kw["magnitude_ratio"])
    for chunk in (train_gram_chunks(ds, steps) if gram else train_chunks(ds, steps)):
        idx, G, valid, ids, tgt, mag = chunk[:6]
        labels = tgt if kw["cross_class"] else None
        if gram:
            dropped.add(valid, ids >= 0)
            s, a, b, c = within_batch_pairs_from_cosines(G, valid, labels=labels, norms=mag, **opts)
        else:
            nrm = np.linalg.norm(G, axis=-1)
            dropped.add(valid & (nrm > 0), ids >= 0)
            s, a, b, c = within_batch_pairs(G, valid, labels=labels, norms=mag, **opts)
        rows.append(dict(time=idx[s], a=ids[s, a], b=ids[s, b], ta=tgt[s, a], tb=tgt[s, b],
                         cos=c, na=mag[s, a], nb=mag[s, b]))
    return rows


def _concat(rows) -> dict:
    keys = ("time", "a", "b", "ta", "tb", "cos", "na", "nb")
    if not rows:
        return {k: np.empty(0) for k in keys}
    return {k: np.concatenate([r[k] for r in rows]) for k in keys}


@register_analysis("opposing_pairs", needs=("probe/grad_proj",), tasks=("classification",))  # class-pair tables need class labels
def opposing_pairs(run: Run, cos_threshold: float | None = -0.5, magnitude_ratio: float | None = 2.0,
                   cross_class: bool = True, source: str = "probe", top_k: int = 5,
                   probes=None, steps=None, block: int = 4096, margin: float = 0.0,
                   cosine_source: str = "auto") -> xr.Dataset:
    """Pairs of examples whose gradients point in opposite directions, over time.

    source='probe': all tracked examples against each other at each probe pass (`probes`
    selects passes). source='train': pairs within each training batch (`steps` selects).
    top_k: partners kept per example and time (bounds memory and output).
    margin: z; with sketched cosines a pair is kept only when cos + z sd <= cos_threshold.
    cosine_source: 'auto' (the exact Gram when recorded: train batches, and probe passes
    whose gradients fitted the recorder's probe_gram_budget), 'exact_gram' or 'sketch'.
    """
    check_range("cos_threshold", cos_threshold, -1, 1, "a cosine", optional=True)
    check_range("magnitude_ratio", magnitude_ratio, 1, math.inf, "the largest allowed norm ratio", optional=True)
    check_range("top_k", top_k, 1, math.inf, "partners kept per example")
    ds = gradient_group(run, source)
    gram = use_gram(ds, cosine_source, source,
                    probe_times(ds, probes) if source == "probe" else None)
    c0 = 0.0 if gram else sketch_error(run, source)["c0"]
    kw = dict(cos_threshold=cos_threshold, magnitude_ratio=magnitude_ratio,
              cross_class=cross_class, top_k=top_k, margin=margin)
    kw["effective_threshold"] = margin_threshold(cos_threshold, margin, c0)
    dropped = Dropped("opposing_pairs")
    if source == "probe":
        times = probe_times(ds, probes)
        f = _concat(_probe_pairs(run, ds, probes, kw, block, dropped, gram))
        tdim = "probe"
        all_ids = np.asarray(ds["example_id"].values)
    else:
        times = np.arange(ds.sizes["step"]) if steps is None else np.asarray(steps)
        f = _concat(_train_pairs(ds, times, kw, gram, dropped))
        tdim = "step"
        ids = np.asarray(ds["example_id"].values)
        all_ids = np.unique(ids[ids >= 0])
    order = np.lexsort((f["b"], f["a"], f["cos"], f["time"]))
    f = {k: v[order] for k, v in f.items()}
    ncls = num_classes(run, np.asarray(ds["target"].values))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.maximum(f["na"], f["nb"]) / np.minimum(f["na"], f["nb"])
    out = xr.Dataset(
        {"example_a": ("pair", f["a"].astype(np.int64)), "example_b": ("pair", f["b"].astype(np.int64)),
         "target_a": ("pair", f["ta"].astype(np.int64)), "target_b": ("pair", f["tb"].astype(np.int64)),
         "cosine": ("pair", f["cos"].astype(np.float32)),
         "cosine_sd": ("pair", (c0 * (1 - f["cos"].astype(np.float64) ** 2)).astype(np.float32)),
         "magnitude_ratio": ("pair", ratio.astype(np.float32)),
         "norm_a": ("pair", f["na"].astype(np.float32)), "norm_b": ("pair", f["nb"].astype(np.float32)),
         f"at_{tdim}": ("pair", f["time"].astype(np.int64))})
    if source == "probe":
        out["at_step"] = ("pair", np.asarray(ds["step"].values)[f["time"].astype(np.int64)].astype(np.int64))
    out = out.merge(_summaries(f, times, tdim, ds, all_ids, ncls))
    out = out.assign_coords(class_name=("class_a", class_names(run, np.arange(ncls))))
    out.attrs = {"source": source, "time_dim": tdim,
                 "params": {k: ("none" if v is None else v) for k, v in kw.items()},
                 "cosine_source": "exact_gram" if gram else "sketch",
                 "cosine_sd_at_zero": c0,
                 "cosine_sd_law": "0 (exact Gram)" if gram else "cosine_sd = c0 (1 - cos^2), c0 = cosine_sd_at_zero",
                 "magnitude_ratio_semantics": "max(norm)/min(norm) of the pair; kept if <= the parameter",
                 "description": __doc__.split("\n\n")[1].replace("\n", " ")}
    dropped.finish(out.attrs)
    return out


def _summaries(f, times, tdim, ds, all_ids, ncls) -> xr.Dataset:
    """Counts over time, the symmetric class-pair matrix and pairs per example."""
    pos = np.searchsorted(times, f["time"])
    count = np.bincount(pos, minlength=len(times)) if len(pos) else np.zeros(len(times), int)
    examples = np.zeros(len(times), np.int64)
    for t in np.unique(pos):  # distinct examples per time: cheap, pairs are few
        m = pos == t
        examples[t] = len(np.union1d(f["a"][m], f["b"][m]))
    mat = np.zeros((ncls, ncls), np.int64)
    ta, tb = f["ta"].astype(np.int64), f["tb"].astype(np.int64)
    np.add.at(mat, (ta, tb), 1)
    off = ta != tb
    np.add.at(mat, (tb[off], ta[off]), 1)
    per_ex = np.zeros(len(all_ids), np.int64)
    for col in (f["a"], f["b"]):
        np.add.at(per_ex, np.searchsorted(all_ids, col.astype(np.int64)), 1)
    coords = {tdim: times}
    if tdim == "probe":
        coords["step"] = ("probe", np.asarray(ds["step"].values)[times])
        if "epoch" in ds:
            coords["epoch"] = ("probe", np.asarray(ds["epoch"].values)[times])
    elif "epoch" in ds:
        coords["epoch"] = ("step", np.asarray(ds["epoch"].values)[times])
    return xr.Dataset(
        {"pair_count": (tdim, count), "example_count": (tdim, examples),
         "class_pair_count": (("class_a", "class_b"), mat),
         "pairs_per_example": ("example", per_ex)},
        coords={**coords, "class_a": np.arange(ncls), "class_b": np.arange(ncls),
                "example_id": ("example", all_ids)})
