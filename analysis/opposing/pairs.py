"""Opposing gradient pairs of a recorded run, per probe pass (all tracked examples against
each other) or per training step (within the batch), with counts over time and a
class-pair matrix.

A pair {a, b} is *opposing* when cos(g_a, g_b) <= cos_threshold, its magnitudes are within
a factor `magnitude_ratio` (max/min <= magnitude_ratio: both pull comparably, so neither is
a negligible nudge against the other), optionally the classes differ, and b is among a's
`top_k` most negative partners or a among b's. Cosines come from the stored projections
(unbiased estimates of the true inner products); magnitudes from the exact `grad_norm`.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_analysis
from ..run import Run
from .data import class_names, gradient_group, num_classes, probe_slice, probe_times, train_chunks
from .topk import most_negative_pairs, within_batch_pairs


def _probe_pairs(run, ds, probes, kw, block):
    ids = np.asarray(ds["example_id"].values)
    tgt = np.asarray(ds["target"].values)
    rows = []
    for p in probe_times(ds, probes):
        G, mag = probe_slice(ds, int(p))
        res = most_negative_pairs(G, k=kw["top_k"], block=block, threshold=kw["cos_threshold"],
                                  labels=tgt if kw["cross_class"] else None, norms=mag,
                                  magnitude_ratio=kw["magnitude_ratio"])
        rows.append(dict(time=np.full(len(res), p), a=ids[res.a], b=ids[res.b], ta=tgt[res.a],
                         tb=tgt[res.b], cos=res.cosine, na=mag[res.a], nb=mag[res.b]))
    return rows


def _train_pairs(ds, steps, kw):
    rows = []
    for idx, G, valid, ids, tgt, mag in train_chunks(ds, steps):
        s, a, b, c = within_batch_pairs(G, valid, k=kw["top_k"], threshold=kw["cos_threshold"],
                                        labels=tgt if kw["cross_class"] else None, norms=mag,
                                        magnitude_ratio=kw["magnitude_ratio"])
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
                   probes=None, steps=None, block: int = 4096) -> xr.Dataset:
    """Pairs of examples whose gradients point in opposite directions, over time.

    source='probe': all tracked examples against each other at each probe pass (`probes`
    selects passes). source='train': pairs within each training batch (`steps` selects).
    top_k: partners kept per example and time (bounds memory and output).
    """
    ds = gradient_group(run, source)
    kw = dict(cos_threshold=cos_threshold, magnitude_ratio=magnitude_ratio,
              cross_class=cross_class, top_k=top_k)
    if source == "probe":
        times = probe_times(ds, probes)
        f = _concat(_probe_pairs(run, ds, probes, kw, block))
        tdim = "probe"
        all_ids = np.asarray(ds["example_id"].values)
    else:
        times = np.arange(ds.sizes["step"]) if steps is None else np.asarray(steps)
        f = _concat(_train_pairs(ds, times, kw))
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
         "magnitude_ratio": ("pair", ratio.astype(np.float32)),
         "norm_a": ("pair", f["na"].astype(np.float32)), "norm_b": ("pair", f["nb"].astype(np.float32)),
         f"at_{tdim}": ("pair", f["time"].astype(np.int64))})
    if source == "probe":
        out["at_step"] = ("pair", np.asarray(ds["step"].values)[f["time"].astype(np.int64)].astype(np.int64))
    out = out.merge(_summaries(f, times, tdim, ds, all_ids, ncls))
    out = out.assign_coords(class_name=("class_a", class_names(run, np.arange(ncls))))
    out.attrs = {"source": source, "time_dim": tdim,
                 "params": {k: ("none" if v is None else v) for k, v in kw.items()},
                 "magnitude_ratio_semantics": "max(norm)/min(norm) of the pair; kept if <= the parameter",
                 "description": __doc__.split("\n\n")[1].replace("\n", " ")}
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
