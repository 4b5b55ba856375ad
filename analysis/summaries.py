"""One-line findings per analysis for `dynascope analyze`: what a reader wants to know
first (how many, which classes, when), not the result's dimensions."""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import register_summary


@register_summary("opposing_groups")
def _opposing_groups(r: xr.Dataset) -> str:
    n = r.sizes.get("opposition", 0)
    if not n:
        return "no opposing group pairs at these thresholds"
    parts = []
    for k in range(n):
        a, b = int(r["group_a"][k]), int(r["group_b"][k])
        steps = ", ".join(str(int(s)) for s in np.atleast_1d(r["strongest_step"][k].values)[:3])
        parts.append(f"group {a} (class {int(r['group_class'][a])}, {int(r['group_size'][a])} ex.) vs "
                     f"group {b} (class {int(r['group_class'][b])}, {int(r['group_size'][b])} ex.), "
                     f"grad cos {float(r['gradient_cosine'][k]):.2f}, strongest at steps {steps}")
    return f"{n} opposing pair(s) of groups: " + "; ".join(parts)


@register_summary("opposing_pairs")
def _opposing_pairs(r: xr.Dataset) -> str:
    n = r.sizes.get("pair", 0)
    if not n:
        return "no opposing pairs at these thresholds"
    m = r["class_pair_count"]
    flat = int(np.nanargmax(m.values))
    a, b = np.unravel_index(flat, m.shape)
    return (f"{n} opposing pairs (min cosine {float(r['cosine'].min()):.2f}); most between classes "
            f"{a} and {b} ({int(m.values[a, b])})")


@register_summary("forgetting")
def _forgetting(r: xr.Dataset) -> str:
    ev = r["forgetting_events"].values
    return (f"{int(r['unforgettable'].sum())} unforgettable, {int(r['never_learned'].sum())} never learned; "
            f"mean {np.nanmean(ev[np.isfinite(ev)]):.2f} forgetting events per example")


@register_summary("mislabel_detection")
def _mislabel(r: xr.Dataset) -> str:
    n = r["n_scored"].values if "n_scored" in r else [None] * r.sizes["score"]
    pairs = ", ".join(f"{s} {float(v):.3f}" + (f" (of {int(k)} examples)" if k is not None and
                                                 int(k) < r.attrs.get("num_examples", 0) else "")
                      for s, v, k in zip(r["score"].values, r["auroc"].values, n))
    return f"AUROC for finding the flipped labels: {pairs}"
