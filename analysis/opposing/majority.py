"""Opposition to the majority: the cosine between each example's gradient and the mean
gradient of everyone else in its batch (train) or in the probe set (probe).

The leave-one-out mean m_{-i} = (sum_j g_j - g_i) / (n - 1) is what the other examples
push the model towards; an example with cos(g_i, m_{-i}) < threshold is fighting that
step. Projections are linear, so the projected mean is the projection of the mean. Within
training batches the exact Gram is used when recorded: every quantity is a Gram row sum.
"""
from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from ..checks import check_range
from ..registry import register_analysis
from ..run import Run
from .data import Dropped, gradient_group, probe_slice, probe_times, train_chunks, train_gram_chunks, use_gram


def loo_cosine(G: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos(g_i, leave-one-out mean) along axis -2 of G (..., n, D); NaN where invalid.

    Also returns cos(g_i, full mean) - the alignment with the step actually taken.
    """
    G = np.where(valid[..., None], G, 0).astype(np.float64)
    n = valid.sum(-1, keepdims=True)
    total = G.sum(-2, keepdims=True)
    loo = (total - G) / np.maximum(n - 1, 1)[..., None]
    gn = np.linalg.norm(G, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c_loo = np.einsum("...d,...d->...", G, loo) / (gn * np.linalg.norm(loo, axis=-1))
        c_all = np.einsum("...d,...d->...", G, total) / (gn * np.linalg.norm(total, axis=-1))
    bad = ~valid | (n < 2) | (gn == 0)
    return np.where(bad, np.nan, c_loo), np.where(bad, np.nan, c_all)


def gram_loo_cosine(K: np.ndarray, valid: np.ndarray):
    """loo_cosine from Grams K (S, B, B): (cos to the leave-one-out mean, cos to the full
    mean, norm of the mean gradient)."""
    K = np.where(valid[:, :, None] & valid[:, None, :], K, 0.0)
    n = valid.sum(1, keepdims=True).astype(np.float64)
    d = np.diagonal(K, axis1=1, axis2=2)
    r = K.sum(2)                     # <g_i, sum_j g_j>
    S = r.sum(1, keepdims=True)      # |sum_j g_j|^2
    with np.errstate(invalid="ignore", divide="ignore"):
        loo_sq = np.maximum(S - 2 * r + d, 0)  # |sum_{j != i} g_j|^2
        c_loo = (r - d) / np.sqrt(d * loo_sq)
        c_all = r / np.sqrt(d * S)
    bad = ~valid | (n < 2) | (d <= 0)
    return (np.where(bad, np.nan, c_loo), np.where(bad, np.nan, c_all),
            np.sqrt(np.maximum(S[:, 0], 0)) / np.maximum(n[:, 0], 1))


@register_analysis("majority_opposition", needs=("train/grad_proj",))
def majority_opposition(run: Run, source: str = "train", threshold: float = 0.0,
                        probes=None, steps=None, cosine_source: str = "auto") -> xr.Dataset:
    """Per example and over time: cosine to the others' mean gradient; who opposes it.

    threshold: an example opposes the majority when its cosine is below it (0: any
    component against the mean step). cosine_source (train): 'auto' (the exact Gram when
    recorded), 'exact_gram' or 'sketch'.
    """
    check_range("threshold", threshold, -1, 1, "a cosine")
    ds = gradient_group(run, source)
    gram = source == "train" and use_gram(ds, cosine_source)
    dropped = Dropped("majority_opposition")
    if source == "probe":
        times = probe_times(ds, probes)
        ids = np.asarray(ds["example_id"].values)
        cos = np.full((len(times), len(ids)), np.nan)
        cos_all = np.full_like(cos, np.nan)
        mean_norm = np.zeros(len(times))
        for t, p in enumerate(times):
            G, _ = probe_slice(ds, int(p))
            ok = np.isfinite(G).all(1) & (np.abs(G).sum(1) > 0)
            dropped.add(ok, np.ones(len(ok), bool))
            cos[t], cos_all[t] = loo_cosine(G, ok)
            mean_norm[t] = np.linalg.norm(np.where(ok[:, None], G, 0).sum(0) / max(ok.sum(), 1))
        dims = ("probe", "example")
        out = xr.Dataset({"cosine": (dims, cos.astype(np.float32)),
                          "cosine_to_mean": (dims, cos_all.astype(np.float32))},
                         coords={"probe": times, "step": ("probe", np.asarray(ds["step"].values)[times]),
                                 "example_id": ("example", ids)})
        opp = cos < threshold
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_ex = xr.Dataset({
                "mean_cosine": ("example", np.nanmean(cos, 0).astype(np.float32)),
                "example_opposing_fraction": ("example", (opp.sum(0) / np.isfinite(cos).sum(0)).astype(np.float32))})
    else:
        times = np.arange(ds.sizes["step"]) if steps is None else np.asarray(steps)
        parts, mean_norm = [], []
        for chunk in (train_gram_chunks(ds, times) if gram else train_chunks(ds, times)):
            idx, G, valid, ids = chunk[:4]
            if gram:
                c, call, mn = gram_loo_cosine(chunk[6], valid)
            else:
                valid = valid & (np.abs(G).sum(-1) > 0)
                c, call = loo_cosine(G, valid)
                m = np.where(valid[..., None], G, 0).sum(1) / np.maximum(valid.sum(1), 1)[:, None]
                mn = np.linalg.norm(m, axis=1)
            dropped.add(valid, ids >= 0)
            parts.append((c, call, ids))
            mean_norm.append(mn)
        cos = np.concatenate([p[0] for p in parts])
        cos_all = np.concatenate([p[1] for p in parts])
        ids = np.concatenate([p[2] for p in parts])
        mean_norm = np.concatenate(mean_norm)
        dims = ("step", "slot")
        out = xr.Dataset({"cosine": (dims, cos.astype(np.float32)),
                          "cosine_to_mean": (dims, cos_all.astype(np.float32))},
                         coords={"step": times, "example_id": (dims, ids)})
        per_ex = _per_example(cos, ids, threshold)
        opp = cos < threshold
    n_valid = np.isfinite(cos).sum(1)
    out["opposes"] = (dims, opp)
    out["opposing_fraction"] = (dims[0], (opp.sum(1) / np.maximum(n_valid, 1)).astype(np.float32))
    out["mean_gradient_norm"] = (dims[0], np.asarray(mean_norm, dtype=np.float32))
    out = out.merge(per_ex)
    out.attrs = {"source": source, "params": {"threshold": threshold, "cosine_source": cosine_source},
                 "cosine_source": "exact_gram" if gram else "sketch",
                 "description": __doc__.split("\n\n")[1].replace("\n", " ")}
    dropped.finish(out.attrs)
    return out


def _per_example(cos, ids, threshold) -> xr.Dataset:
    """Mean cosine and fraction of presentations opposing, per example id (coordinate
    `example`), by segmented sums."""
    ok = np.isfinite(cos) & (ids >= 0)
    e, c = ids[ok], cos[ok]
    uniq, inv = np.unique(e, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq))
    mean = np.bincount(inv, weights=c, minlength=len(uniq)) / np.maximum(n, 1)
    frac = np.bincount(inv, weights=(c < threshold), minlength=len(uniq)) / np.maximum(n, 1)
    return xr.Dataset({"mean_cosine": ("example", mean.astype(np.float32)),
                       "example_opposing_fraction": ("example", frac.astype(np.float32)),
                       "presentations": ("example", n)},
                      coords={"example": uniq})
