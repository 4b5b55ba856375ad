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
    """Always the mean over examples learned at least once, whatever `never_learned` says,
    and the convention named: never-learned examples would otherwise count as presentations."""
    ev = r["forgetting_events"].values
    never = r["never_learned"].values.astype(bool)
    learned = ev[~never & np.isfinite(ev)]
    return (f"{int(r['unforgettable'].sum())} unforgettable, {int(never.sum())} never learned; "
            f"mean {np.mean(learned) if len(learned) else float('nan'):.2f} forgetting events per learned example "
            f"(never-learned examples excluded from the mean)")


@register_summary("mislabel_detection")
def _mislabel(r: xr.Dataset) -> str:
    n = r["n_scored"].values if "n_scored" in r else [None] * r.sizes["score"]
    pairs = ", ".join(f"{s} {float(v):.3f}" + (f" (of {int(k)} examples)" if k is not None and
                                                 int(k) < r.attrs.get("num_examples", 0) else "")
                      for s, v, k in zip(r["score"].values, r["auroc"].values, n))
    return f"AUROC for finding the flipped labels: {pairs}"


@register_summary("opposing_detection")
def _opposing_detection(r: xr.Dataset) -> str:
    return (f"opposing groups vs the planted feature: precision {float(r['precision']):.2f}, "
            f"recall {float(r['recall']):.2f} ({int(r['true_positives'])} of {int(r['detected'])} detected "
            f"are planted; {int(r['planted'])} planted among {int(r['tracked'])} tracked)")


@register_summary("generalisation_gap")
def _gap(r: xr.Dataset) -> str:
    line = (f"at step {int(r['step'][-1])}: probe-subset accuracy {100 * float(r['probe_accuracy'][-1]):.1f}% vs "
            f"held-out {100 * float(r['eval_accuracy'][-1]):.1f}% (same model), gap {100 * float(r['gap'][-1]):+.1f} pp")
    if "clean_gap" in r:
        line += f"; on unflipped probe labels {100 * float(r['clean_gap'][-1]):+.1f} pp"
    return line
