"""The train/held-out gap on comparable quantities: at each pass where the probe subset and
the held-out split were both evaluated after the same training step, the same model's
accuracy on each (probe examples scored against the labels they are trained with).

In-epoch training accuracy is not comparable: it averages a model that changes over the
epoch, on presentations made before each update.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import register_analysis
from .run import Run


def _accuracy(ds, rows) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(ds["logits"].isel({ds["logits"].dims[0]: rows}).values, np.float64)
    target = np.asarray(ds["target"].values)
    ok = np.isfinite(logits).all(-1) & (target >= 0)[None]
    hit = (np.nan_to_num(logits, nan=-np.inf).argmax(-1) == target[None]) & ok
    return hit, ok


@register_analysis("generalisation_gap", needs=("probe/logits", "eval/logits"))
def generalisation_gap(run: Run) -> xr.Dataset:
    """Probe-subset accuracy minus held-out accuracy at the passes both were measured after
    the same training step, overall and per class (percentage points = 100 x the gap)."""
    p, e = run.probe, run.eval
    ps, es = np.asarray(p["step"].values), np.asarray(e["step"].values)
    common = np.intersect1d(ps, es)
    if not len(common):
        raise ValueError("no training step has both a probe pass and a held-out pass; record probes at "
                         "the held-out passes (probe_every=0 probes once per epoch, like eval)")
    pi = np.array([np.flatnonzero(ps == s)[-1] for s in common])
    ei = np.array([np.flatnonzero(es == s)[-1] for s in common])
    ph, pok = _accuracy(p, pi)
    eh, eok = _accuracy(e, ei)
    k = run.num_classes or int(max(p["target"].max(), e["target"].max()) + 1)
    pt, et = np.asarray(p["target"].values), np.asarray(e["target"].values)

    def per_class(hit, ok, target):
        out = np.full((hit.shape[0], k), np.nan)
        for c in range(k):
            m = ok & (target == c)[None]
            with np.errstate(invalid="ignore"):
                out[:, c] = hit.sum(1, where=m) / m.sum(1)
        return out

    pc, ec = per_class(ph, pok, pt), per_class(eh, eok, et)
    out = xr.Dataset(
        {"probe_accuracy": ("pass", ph.sum(1) / pok.sum(1)), "eval_accuracy": ("pass", eh.sum(1) / eok.sum(1)),
         "probe_class_accuracy": (("pass", "class_id"), pc), "eval_class_accuracy": (("pass", "class_id"), ec)},
        coords={"step": ("pass", common), "epoch": ("pass", np.asarray(e["epoch"].values)[ei]),
                "class_id": np.arange(k)})
    out["gap"] = out["probe_accuracy"] - out["eval_accuracy"]
    if run.has("ground_truth", "is_mislabeled"):
        # flipped labels cannot be "generalised"; without them both sides carry clean labels
        clean = ~run.ground_truth["is_mislabeled"].values.astype(bool)[np.asarray(p["example_id"].values)]
        m = pok & clean[None]
        out["probe_clean_accuracy"] = ("pass", ph.sum(1, where=m) / m.sum(1))
        out["clean_gap"] = out["probe_clean_accuracy"] - out["eval_accuracy"]
    out["class_gap"] = out["probe_class_accuracy"] - out["eval_class_accuracy"]
    out.attrs["definition"] = ("probe-subset accuracy (training labels) minus held-out accuracy, same model, "
                               "same training step")
    return out
