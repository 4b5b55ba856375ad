"""Opposing groups by the loss-change method of Rosenfeld & Risteski (2023), automated.

1. Between consecutive probe passes, each tracked example's loss changes by delta. The
   `top_fraction` largest increases and largest decreases of every interval are the extreme
   movers; examples that are extreme in >= `min_hits` intervals are candidates.
2. Candidates are grouped within their class by gradient-projection similarity (average
   linkage on the cosine averaged over probes, merged while >= `similarity`); groups smaller
   than `min_group_size` are dropped.
3. Two groups oppose when their mean loss changes are anti-correlated over time
   (Pearson <= `max_loss_correlation`) and their mean gradients point apart when it matters:
   the per-probe cosine of the groups' mean unit gradients, averaged with weights
   |pull_a| |pull_b| max(0, -d_a d_b) (mean-gradient norms at the probe times the groups'
   oscillation in the following interval), is <= `max_gradient_cosine`. Unweighted, a short
   oscillation episode is drowned by the long fitted phase where directions are noise.
4. Oscillation strength per interval, sqrt(max(0, -d_a * d_b)), locates the steps where the
   two groups trade loss; it is correlated with spikes of the training loss in the interval.

Probe passes are the right source: every tracked example's loss is observed at each pass
(training presentations see an example once per epoch). Record with a small probe cadence
(`--probe-every`) to resolve step-scale oscillations, as the paper evaluates every step.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from ..registry import register_analysis
from ..run import Run
from .clustering import average_linkage
from .data import Dropped, gradient_group, probe_slice


def extreme_movers(delta: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example, how many intervals it is among the `top` largest increases / decreases.
    NaN deltas never count."""
    T, N = delta.shape
    top = max(1, min(top, N))
    up = np.where(np.isfinite(delta), delta, -np.inf)
    down = np.where(np.isfinite(delta), -delta, -np.inf)
    inc = np.zeros(N, np.int64)
    dec = np.zeros(N, np.int64)
    for arr, hits in ((up, inc), (down, dec)):
        idx = np.argpartition(-arr, top - 1, axis=1)[:, :top]
        keep = np.take_along_axis(arr, idx, 1) > 0  # an "increase" must be positive
        np.add.at(hits, idx[keep], 1)
    return inc, dec


def robust_z(x: np.ndarray, axis=-1) -> np.ndarray:
    """(x - median) / (1.4826 MAD): outlier score insensitive to the outliers themselves."""
    med = np.nanmedian(x, axis=axis, keepdims=True)
    mad = 1.4826 * np.nanmedian(np.abs(x - med), axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x - med) / np.where(mad > 0, mad, np.nan)


def weighted_opposition(cos_t, pull_a, pull_b, d_a, d_b) -> float:
    """Mean of the per-probe gradient cosine (P,), weighted by how hard both groups pull at
    the probe (P,) times their oscillation max(0, -d_a d_b) in the interval after it (P-1,).
    NaN when the groups never move in opposite directions."""
    w = pull_a[:-1] * pull_b[:-1] * np.maximum(0.0, -d_a * d_b)
    return float((cos_t[:-1] * w).sum() / w.sum()) if w.sum() > 0 else np.nan


def _unit(G):
    n = np.linalg.norm(G, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n > 0) & np.isfinite(n), G / n, 0.0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return np.nan
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else np.nan


def _group_gradients(ds, cand, group, K, P):
    """Per probe and group: the unit vector of the mean unit gradient (direction) and the
    norm of the mean raw gradient (how hard the group pulls). Pass 2 over the probes."""
    direction = np.zeros((P, K, 1)) if K == 0 else None
    pull = np.zeros((P, K))
    for p in range(P):
        G = probe_slice(ds, p)[0][cand].astype(np.float64)
        G = np.where(np.isfinite(G), G, 0.0)
        U = _unit(G)
        if direction is None:
            direction = np.zeros((P, K, G.shape[1]))
        for g in range(K):
            m = group == g
            direction[p, g] = U[m].mean(0)
            pull[p, g] = np.linalg.norm(G[m].mean(0))
    return _unit(direction), pull


def _train_spikes(run: Run, steps: np.ndarray) -> np.ndarray:
    """Per probe interval (steps[t], steps[t+1]]: the largest robust z of the batch-loss
    increase inside it (NaN without a train group)."""
    T = len(steps) - 1
    if not run.has("train", "batch_loss") or T < 1:
        return np.full(T, np.nan)
    bl = np.asarray(run.train["batch_loss"].values, dtype=np.float64)
    z = robust_z(np.r_[np.nan, np.diff(bl)])
    out = np.full(T, np.nan)
    for t in range(T):
        seg = z[steps[t]:steps[t + 1]]  # train rows recorded between the two passes
        if np.isfinite(seg).any():
            out[t] = np.nanmax(seg)
    return out


@register_analysis("opposing_groups", needs=("probe/grad_proj", "probe/loss"))
def opposing_groups(run: Run, top_fraction: float = 0.05, min_hits: int = 1,
                    similarity: float = 0.6, min_group_size: int = 5,
                    max_loss_correlation: float = -0.2, max_gradient_cosine: float = -0.7,
                    cross_class: bool = True, max_candidates: int = 2000, top_steps: int = 5) -> xr.Dataset:
    """Groups of examples whose losses move in opposite directions and whose gradients oppose
    (defaults chosen on recorded planted/control runs; see docs/OPPOSING.md)."""
    ds = gradient_group(run, "probe")
    loss = np.asarray(ds["loss"].values, dtype=np.float64)
    ids = np.asarray(ds["example_id"].values)
    tgt = np.asarray(ds["target"].values)
    steps = np.asarray(ds["step"].values)
    P, N = loss.shape
    delta = np.diff(loss, axis=0)
    inc, dec = extreme_movers(delta, int(np.ceil(top_fraction * N)))
    hits = inc + dec
    cand = np.flatnonzero(hits >= min_hits)
    if len(cand) > max_candidates:
        cand = np.sort(cand[np.argsort(-hits[cand], kind="stable")[:max_candidates]])
    # pass 1: mean pairwise gradient cosine of the candidates over probes (O(M^2) memory)
    sim = np.zeros((len(cand), len(cand)))
    dropped = Dropped("opposing_groups")  # a NaN / zero candidate row counts as similarity 0
    for p in range(P):
        G = probe_slice(ds, p)[0][cand].astype(np.float64)
        n = np.linalg.norm(G, axis=1)
        dropped.add(np.isfinite(n) & (n > 0), np.ones(len(cand), bool))
        U = _unit(G)
        sim += U @ U.T / P
    group = np.full(len(cand), -1)
    next_id = 0
    for c in np.unique(tgt[cand]):
        m = np.flatnonzero(tgt[cand] == c)
        lab = average_linkage(sim[np.ix_(m, m)], similarity)
        for g in np.unique(lab):
            members = m[lab == g]
            if len(members) >= min_group_size:
                group[members] = next_id
                next_id += 1
    K = next_id
    mean_loss = np.stack([loss[:, cand[group == g]].mean(1) for g in range(K)]) if K else np.zeros((0, P))
    dmean = np.diff(mean_loss, axis=1)
    gdir, gpull = _group_gradients(ds, cand, group, K, P)
    gcls = np.array([np.bincount(tgt[cand[group == g]]).argmax() for g in range(K)], np.int64)
    spikes = _train_spikes(run, steps)
    rows = []
    for a in range(K):
        for b in range(a + 1, K):
            if cross_class and gcls[a] == gcls[b]:
                continue
            rho = _pearson(dmean[a], dmean[b])
            cos_t = np.sum(gdir[:, a] * gdir[:, b], -1)  # per probe
            gcos = weighted_opposition(cos_t, gpull[:, a], gpull[:, b], dmean[a], dmean[b])
            if not (rho <= max_loss_correlation and gcos <= max_gradient_cosine):
                continue
            osc = np.sqrt(np.maximum(0.0, -dmean[a] * dmean[b]))
            rows.append((a, b, rho, gcos, osc, _pearson(osc, spikes), float(cos_t.mean())))
    rows.sort(key=lambda r: -r[4].sum())
    out = _result(run, ds, ids, tgt, steps, cand, hits, inc, dec, group, K, gcls, mean_loss,
                  dmean, rows, spikes, top_steps, locals_params(top_fraction, min_hits, similarity,
                  min_group_size, max_loss_correlation, max_gradient_cosine, cross_class, max_candidates))
    dropped.finish(out.attrs)
    return out


def locals_params(*vals) -> dict:
    keys = ("top_fraction", "min_hits", "similarity", "min_group_size", "max_loss_correlation",
            "max_gradient_cosine", "cross_class", "max_candidates")
    return dict(zip(keys, vals))


def _result(run, ds, ids, tgt, steps, cand, hits, inc, dec, group, K, gcls, mean_loss, dmean,
            rows, spikes, top_steps, params) -> xr.Dataset:
    T = len(steps) - 1
    in_pair = np.zeros(K, bool)
    for r in rows:
        in_pair[[r[0], r[1]]] = True
    member = np.flatnonzero(group >= 0)
    detected = np.zeros(len(ids), bool)
    for g in np.flatnonzero(in_pair):
        detected[cand[group == g]] = True
    osc = np.array([r[4] for r in rows]).reshape(len(rows), T)
    ntop = min(top_steps, T)
    top_int = np.argsort(-osc, axis=1, kind="stable")[:, :ntop] if len(rows) else np.zeros((0, ntop), int)
    out = xr.Dataset(
        {"group_class": ("group", gcls), "group_size": ("group", np.bincount(group[member], minlength=K)),
         "group_in_opposition": ("group", in_pair),
         "group_mean_loss": (("group", "probe"), mean_loss.astype(np.float32)),
         "group_loss_change": (("group", "interval"), dmean.astype(np.float32)),
         "member_example_id": ("member", ids[cand[member]]),
         "member_group": ("member", group[member]),
         "member_target": ("member", tgt[cand[member]]),
         "member_hits": ("member", hits[cand[member]]),
         "group_a": ("opposition", np.array([r[0] for r in rows], np.int64)),
         "group_b": ("opposition", np.array([r[1] for r in rows], np.int64)),
         "loss_correlation": ("opposition", np.array([r[2] for r in rows], np.float32)),
         "gradient_cosine": ("opposition", np.array([r[3] for r in rows], np.float32)),
         "gradient_cosine_unweighted": ("opposition", np.array([r[6] for r in rows], np.float32)),
         "oscillation": (("opposition", "interval"), osc.astype(np.float32)),
         "strongest_step": (("opposition", "rank"), steps[1:][top_int]),
         "spike_correlation": ("opposition", np.array([r[5] for r in rows], np.float32)),
         "train_loss_spike": ("interval", spikes.astype(np.float32)),
         "detected": ("example", detected),
         "increase_hits": ("example", inc), "decrease_hits": ("example", dec)},
        coords={"probe": np.arange(len(steps)), "step": ("probe", steps),
                "interval_start": ("interval", steps[:-1]), "interval_end": ("interval", steps[1:]),
                "example_id": ("example", ids), "target": ("example", tgt)})
    out.attrs = {"params": params, "method": "Rosenfeld & Risteski (2023) loss-change groups",
                 "oscillation": "sqrt(max(0, -dA*dB)) of the groups' mean loss changes per interval",
                 "train_loss_spike": "max robust z of the batch-loss increase within the interval"}
    return out
