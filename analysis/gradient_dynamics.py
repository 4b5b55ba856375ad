"""Optimization insight from the `params/` row group (issue 7; docs/OPTIMIZATION.md).

Near-zero gradient counts, released vs retained near-zero gradients, sign-flip fractions,
weight-difference norms, secant curvature (minimum- vs maximum-like steps) and dead units,
per step, per parameter tensor and per epoch; plus the gradient-sign matrix behind the
layer-wise heatmap (from `snapshots/`). Thresholds are chosen here, offline: counts are
exact for every threshold on a histogram edge (`params/edge`).
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from .registry import register_analysis
from .run import Run, RunError


def edge_index(edges: np.ndarray, value: float, what: str, snap: bool = False) -> tuple[int, float]:
    """Index of `value` among the float32 histogram edges (exact match), or the nearest edge
    in log space when `snap`; raises with the neighbouring edges otherwise."""
    edges = np.asarray(edges, dtype=np.float32)
    v = np.float32(value)
    hit = np.flatnonzero(edges == v)
    if hit.size:
        return int(hit[0]), float(edges[hit[0]])
    if not value > 0:
        raise ValueError(f"{what} must be > 0, got {value}")
    if snap:
        k = int(np.argmin(np.abs(np.log(edges.astype(np.float64)) - np.log(float(value)))))
        return k, float(edges[k])
    j = int(np.searchsorted(edges, v))
    near = ", ".join(f"{e:.3g}" for e in edges[max(0, j - 2):j + 2])
    raise ValueError(f"{what}={value:g} is not a histogram edge, so counts at it would be "
                     f"inexact; nearby edges: {near} (all in run.group('params').edge). "
                     f"Pick one, or pass snap_to_edge=True to use the nearest edge")


def _rolling_mean(x: xr.DataArray, window: int) -> xr.DataArray:
    """Centred: a trailing mean would move every peak late by half a window."""
    return x.rolling(step=min(window, x.sizes["step"]), center=True, min_periods=1).mean()


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _step_epochs(run: Run, n: int) -> np.ndarray:
    if run.has("train", "epoch"):
        ep = np.asarray(run.train["epoch"].values[:n], dtype=np.int64)
        if len(ep) == n:
            return ep
        return np.concatenate([ep, np.full(n - len(ep), ep[-1] if len(ep) else 0)])
    return np.zeros(n, dtype=np.int64)


def _reduce(p: xr.Dataset, k_eps: int, k_nz: int, dead_window: int) -> xr.Dataset:
    """The (step, param)-sized inputs, reduced lazily from the stored arrays in one compute:
    histogram sums at the two thresholds, the released table at near_zero, and dead units."""
    hist = p["grad_hist"]
    out = {"below": hist.isel(bin=0) if k_eps < 0 else hist.isel(bin=slice(0, k_eps + 2)).sum("bin"),
           "near_zero": hist.isel(bin=slice(0, k_nz + 2)).sum("bin")}
    if "released" in p:
        out["released"] = p["released"].isel(edge=k_nz)
    if "prev_grad_hist" in p:       # recorded under a cadence: the previous step is not a row
        out["near_zero_prev"] = p["prev_grad_hist"].isel(bin=slice(0, k_nz + 2)).sum("bin")
    for var in ("sign_flips", "weight_diff_norm", "update_norm", "grad_norm", "secant_dot"):
        if var in p:
            out[var] = p[var]
    if "unit_zero" in p and "unit_param" in p:
        upar = np.asarray(p["unit_param"].values, np.int64)
        onehot = xr.DataArray((upar[:, None] == np.arange(p.sizes["param"])).astype(np.int32),
                              dims=("unit", "param"))
        zero = p["unit_zero"].astype(np.int32)
        dead = zero.rolling(step=min(dead_window, p.sizes["step"])).sum() == dead_window
        out["zero_units_by_param"] = xr.dot(zero, onehot, dim="unit")
        out["dead_by_param"] = xr.dot(dead.astype(np.int32), onehot, dim="unit")
        out["dead_at_end"] = dead.isel(step=-1)
    return xr.Dataset(out).reset_coords(drop=True).compute()


@register_analysis("gradient_dynamics", needs=("params/grad_hist",))
def gradient_dynamics(run: Run, eps: float = 1e-7, near_zero: float = 1e-5, window: int = 50,
                      dead_window: int | None = None, snap_to_edge: bool = False) -> xr.Dataset:
    """Near-zero counts, released/retained, sign flips, weight steps, curvature, dead units.

    eps: count gradient components with |g| < eps (must be a histogram edge; eps=0 counts
        exact zeros). near_zero: the threshold of "near-zero" for released vs retained
        (must be an edge). window: moving-average window in steps (and for the windowed
        curvature). dead_window: a unit is dead at step t if its gradient was exactly zero at
        every step of t-dead_window+1..t (default: `window`).
    """
    p = run.group("params")
    need = ["grad_hist", "edge", "param_size"]
    missing = [v for v in need if v not in p.variables]
    if missing:
        raise RunError(f"params group lacks {missing}; record with the params extension")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    dead_window = int(dead_window or window)
    # under a cadence (param_stats_every=N) rows are every N-th step: windows given in steps
    # span ceil(window / N) rows
    every = max(1, int(run.extensions.get("params", {}).get("every", 1)))
    edges = p["edge"].values
    n, P = p.sizes["step"], p.sizes["param"]
    if n == 0:
        raise RunError("the params group has no committed steps yet")
    size = np.asarray(p["param_size"].values, np.int64)
    total = int(size.sum())
    if eps == 0:
        k_eps, eps_used = -1, 0.0
    else:
        k_eps, eps_used = edge_index(edges, eps, "eps", snap_to_edge)
    k_nz, nz_used = edge_index(edges, near_zero, "near_zero", snap_to_edge)
    window_steps, window = window, max(1, -(-window // every))
    dead_steps, dead_window = dead_window, max(1, -(-dead_window // every))
    raw = _reduce(p, k_eps, k_nz, dead_window)       # one lazy pass; only (step, param)-sized results
    below = raw["below"].values                                         # #(|g| < eps)
    nz_now = raw["near_zero"].values
    if "near_zero_prev" in raw:
        nz_prev = raw["near_zero_prev"].values
    else:
        nz_prev = np.concatenate([np.full((1, P), -1), nz_now[:-1]])  # near-zero at t-1

    rows = np.arange(n)
    steps = np.asarray(p["step"].values, np.int64) if "step" in p.variables else rows
    names = p["param"].values if "param" in p.variables else np.arange(P)
    step_epoch = _step_epochs(run, int(steps.max()) + 1)[steps]
    sp, s = ("step", "param"), "step"
    ds = xr.Dataset(coords={"step": steps, "param": names, "step_epoch": (s, step_epoch)})
    ds["param_size"] = ("param", size)
    ds["below_eps_by_param"] = (sp, below)
    ds["below_eps"] = (s, below.sum(1))
    ds["below_eps_fraction"] = (s, below.sum(1) / total)
    ds["near_zero_by_param"] = (sp, nz_now)

    if "released" in raw:
        rel = np.asarray(raw["released"].values, np.float64)
        rel[0] = np.nan
        rel[rel < 0] = np.nan                                          # no previous step recorded
        prev = np.where((rows[:, None] > 0) & ~np.isnan(rel), nz_prev, np.nan).astype(np.float64)
        ds["released_by_param"] = (sp, rel)
        ds["retained_by_param"] = (sp, prev - rel)
        ds["released_fraction_by_param"] = (sp, _ratio(rel, prev))
        rs, ps = rel.sum(1), prev.sum(1)
        ds["released_fraction"] = (s, _ratio(rs, ps))
        ds["retained_fraction"] = (s, np.where(ps > 0, 1 - _ratio(rs, ps), np.nan))
        ds["near_zero_prev"] = (s, ps)

    if "sign_flips" in raw:
        flips = np.asarray(raw["sign_flips"].values, np.float64)
        flips[flips < 0] = np.nan                                       # step 0: no previous
        ds["sign_flips_by_param"] = (sp, flips)
        ds["sign_flip_fraction_by_param"] = (sp, flips / size)
        ds["sign_flip_fraction"] = (s, flips.sum(1) / total)           # NaN at step 0

    for var in ("weight_diff_norm", "update_norm", "grad_norm"):
        if var in raw:
            v = np.asarray(raw[var].values, np.float64)
            ds[f"{var}_by_param"] = (sp, v)
            tot = np.sqrt((v ** 2).sum(1))                              # NaN if any tensor is NaN
            ds[var] = (s, tot)

    if "secant_dot" in raw and "weight_diff_norm" in raw:
        dot = np.asarray(raw["secant_dot"].values, np.float64)
        dw2 = np.asarray(raw["weight_diff_norm"].values, np.float64) ** 2
        curv = _ratio(dot, dw2)
        ds["curvature_by_param"] = (sp, curv)
        ds["curvature_class_by_param"] = (sp, np.sign(np.nan_to_num(curv)).astype(np.int8))
        num = xr.DataArray(np.nan_to_num(dot), dims=sp).rolling(step=window, min_periods=1).sum()
        den = xr.DataArray(np.nan_to_num(dw2), dims=sp).rolling(step=window, min_periods=1).sum()
        cw = _ratio(num.values, den.values)
        ds["curvature_window_by_param"] = (sp, cw)
        ds["curvature_window_class_by_param"] = (sp, np.sign(np.nan_to_num(cw)).astype(np.int8))
        known = ~np.isnan(curv)
        ds["minimum_like_fraction"] = (s, _ratio((curv > 0).sum(1), known.sum(1)))
        # all-parameter secant curvature: sum of dots over sum of squared step norms
        ds["curvature"] = (s, _ratio(np.nansum(dot, 1), np.where(known.any(1), np.nansum(dw2, 1), 0)))

    if "dead_by_param" in raw:
        upar = np.asarray(p["unit_param"].values, np.int64)
        units = np.bincount(upar, minlength=P)
        valid = rows >= dead_window - 1
        dead_by = raw["dead_by_param"].values.astype(np.int64)
        ds["dead_units_by_param"] = (sp, np.where(valid[:, None], dead_by, -1))
        ds["dead_unit_fraction"] = (s, np.where(valid, dead_by.sum(1) / max(1, units.sum()), np.nan))
        ds["units"] = ("param", units)
        ds["unit_param"] = ("unit", upar)
        if "unit_index" in p:
            ds["unit_index"] = ("unit", np.asarray(p["unit_index"].values, np.int64))
        ds["dead_at_end"] = ("unit", raw["dead_at_end"].values.astype(bool))
        ds["zero_grad_units_by_param"] = (sp, raw["zero_units_by_param"].values.astype(np.int64))

    for var in ("below_eps", "below_eps_fraction", "released_fraction", "sign_flip_fraction",
                "weight_diff_norm", "update_norm", "grad_norm"):
        if var in ds:
            ds[f"{var}_ma"] = _rolling_mean(ds[var], window)

    _add_epochs(ds, step_epoch)
    ds.attrs.update({"eps": float(eps), "eps_used": eps_used, "near_zero": float(near_zero),
                     "near_zero_used": nz_used, "window": int(window_steps), "dead_window": int(dead_steps),
                     "every": every, "window_rows": int(window), "dead_window_rows": int(dead_window),
                     "total_components": total,
                     "note": "counts are exact at histogram edges (float32 |g| compared with the "
                             "float32 edge); see docs/OPTIMIZATION.md"})
    _describe(ds)
    return ds


def _add_epochs(ds: xr.Dataset, step_epoch: np.ndarray) -> None:
    """Per-epoch aggregates (dim `epoch`): means over the epoch's steps, ratios of sums."""
    epochs = np.unique(step_epoch)
    idx = [np.flatnonzero(step_epoch == e) for e in epochs]
    ds.coords["epoch"] = epochs

    def per_epoch(values, how):
        out = np.full(len(epochs), np.nan)
        for i, ix in enumerate(idx):
            v = np.asarray(values)[ix]
            if how == "last":
                out[i] = v[-1]
            else:
                v = v[~np.isnan(v)]
                out[i] = v.mean() if v.size else np.nan
        return out

    for var in ("below_eps", "below_eps_fraction", "sign_flip_fraction", "weight_diff_norm",
                "update_norm", "grad_norm", "dead_unit_fraction", "minimum_like_fraction"):
        if var in ds:
            ds[f"epoch_{var}"] = ("epoch", per_epoch(ds[var].values, "mean"))
    if "released_by_param" in ds:
        rel = np.nansum(ds["released_by_param"].values, 1)
        prev = ds["near_zero_prev"].values
        r = np.array([_ratio(np.nansum(rel[ix][prev[ix] >= 0]), np.nansum(prev[ix][prev[ix] >= 0]))
                      for ix in idx], dtype=np.float64)
        ds["epoch_released_fraction"] = ("epoch", r)
    if "below_eps" in ds:
        ds["epoch_below_eps_last"] = ("epoch", per_epoch(ds["below_eps"].values, "last"))


DESCRIPTIONS = {
    "below_eps": "gradient components with |g| < eps (all parameters)",
    "below_eps_fraction": "fraction of gradient components with |g| < eps",
    "released_fraction": "of the components with |g| < near_zero at step t-1, fraction with |g| >= near_zero at t",
    "retained_fraction": "of the components with |g| < near_zero at step t-1, fraction still below at t",
    "sign_flip_fraction": "fraction of gradient components whose sign differs from step t-1 (zeros never flip)",
    "weight_diff_norm": "||w_t - w_{t-1}|| over all parameters (weights at which g_t and g_{t-1} were taken)",
    "update_norm": "||w after the optimizer step that consumed g_t - w_t|| over all parameters",
    "grad_norm": "||g_t|| over all parameters",
    "curvature": "secant curvature <g_t - g_{t-1}, w_t - w_{t-1}> / ||w_t - w_{t-1}||^2 (all parameters)",
    "curvature_class_by_param": "+1 minimum-like (curvature > 0), -1 maximum-like (< 0), 0 flat/unknown",
    "dead_unit_fraction": "fraction of output units whose gradient was exactly zero over the last dead_window steps",
}


def _describe(ds: xr.Dataset) -> None:
    for name, text in DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["long_name"] = text


@register_analysis("gradient_signs", needs=("snapshots",))
def gradient_signs(run: Run, eps: float = 1e-5, params=None, near_zero_only: bool = False) -> xr.Dataset:
    """Sign of each snapshotted gradient component: 0 where |g| <= eps, else -1 / +1.

    near_zero_only=True inverts the selection, as the earlier tool drew it: the sign where
    0 < |g| <= eps, and 0 for the larger components.

    Columns (`index`) run over the snapshotted parameters in recording order, flattened;
    `param_start` marks where each parameter begins. Rows are snapshots, with their step and
    epoch (from train/epoch).
    """
    snap = run.group("snapshots")
    keys = [v[len("grad__"):] for v in snap.data_vars if v.startswith("grad__")]
    meta = run.extensions.get("params", {})
    order = [n.replace(".", "__") for n in meta.get("snapshot_params", [])]
    keys = [k for k in order if k in keys] + [k for k in keys if k not in order]
    if params is not None:
        want = [str(x).replace(".", "__") for x in params]
        unknown = [w for w in want if w not in keys]
        if unknown:
            raise ValueError(f"no snapshots of {unknown}; snapshotted: {keys}")
        keys = want
    if not keys:
        raise RunError("the snapshots group holds no gradients; record with snapshot_params=[...]")
    thr = np.float32(eps)
    blocks, starts, names, pos = [], [], [], 0
    for k in keys:
        g = np.asarray(snap[f"grad__{k}"].values, np.float32)
        small = np.abs(g) <= thr
        sign = np.where(~small if near_zero_only else small, 0, np.sign(g)).astype(np.int8)
        sign[np.isnan(g)] = 0
        blocks.append(sign)
        starts.append(pos)
        names.append(k.replace("__", "."))
        pos += g.shape[1]
    steps = np.asarray(snap["step"].values, np.int64)
    ep = _step_epochs(run, int(steps.max()) + 1 if steps.size else 0)
    out = xr.Dataset({"sign": (("snapshot", "index"), np.concatenate(blocks, axis=1))},
                     coords={"step": ("snapshot", steps), "epoch": ("snapshot", ep[steps] if steps.size else steps)})
    out["param_start"] = ("snapshot_param", np.asarray(starts, np.int64))
    out["param_name"] = ("snapshot_param", np.asarray(names))
    out["sign"].attrs["long_name"] = (f"sign(g) where |g| <= {eps:g}, else 0" if near_zero_only
                                      else f"0 where |g| <= {eps:g}, else sign(g)")
    out.attrs.update({"eps": float(eps), "near_zero_only": int(near_zero_only)})
    return out
