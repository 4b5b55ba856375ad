"""Pearson correlation between the units of two representations, accumulated over sample
chunks so memory is O(p q) whatever the number of samples.

Convention: a unit with zero variance over the samples (a dead ReLU, a constant feature)
has correlation 0 with every unit, itself included. numpy.corrcoef returns NaN there; a
single dead unit would then turn every mean |r| summary into NaN.
"""
from __future__ import annotations

import numpy as np


def _load(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def cross_moments(X, Y=None, chunk_size: int = 1024):
    """(n, cov (p, q), var_x (p), var_y (q)): unnormalised centred sums over all samples.

    Rows are shifted by the first sample before summing, so a constant unit gives a variance
    of exactly 0 and large offsets do not cancel catastrophically.
    """
    same = Y is None
    Y = X if same else Y
    if len(X.shape) != 2 or len(Y.shape) != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"need (samples x units) arrays with the same samples, got {X.shape} and {Y.shape}")
    n = X.shape[0]
    sx = sy = sxy = sxx = syy = cx = cy = None
    for s in range(0, n, chunk_size):
        x = _load(X[s:s + chunk_size])
        y = x if same else _load(Y[s:s + chunk_size])
        if cx is None:
            cx, cy = x[0].copy(), y[0].copy()
            sx, sy = np.zeros_like(cx), np.zeros_like(cy)
            sxy = np.zeros((x.shape[1], y.shape[1]))
            sxx, syy = np.zeros_like(cx), np.zeros_like(cy)
        x = x - cx
        y = x if same else y - cy
        sx += x.sum(0)
        sy += y.sum(0)
        sxy += x.T @ y
        sxx += (x * x).sum(0)
        syy += (y * y).sum(0)
    cov = sxy - np.outer(sx, sy) / n
    var_x = np.maximum(sxx - sx * sx / n, 0.0)
    var_y = np.maximum(syy - sy * sy / n, 0.0)
    return n, cov, var_x, var_y


def pearson(X, Y=None, chunk_size: int = 1024) -> np.ndarray:
    """(p, q) Pearson r between the columns of X (n x p) and of Y (n x q); Y=None: X with itself.

    Zero-variance units get r = 0 (see module docstring); values are clipped to [-1, 1].
    """
    n, cov, var_x, var_y = cross_moments(X, Y, chunk_size)
    if n < 2:
        raise ValueError("Pearson correlation needs at least 2 samples")
    sx, sy = np.sqrt(var_x), np.sqrt(var_y)
    live_x, live_y = sx > 0, sy > 0
    denom = np.outer(np.where(live_x, sx, 1.0), np.where(live_y, sy, 1.0))
    r = np.clip(cov / denom, -1.0, 1.0)
    r[~live_x, :] = 0.0
    r[:, ~live_y] = 0.0
    if Y is None:  # exact ones on the diagonal of live units
        d = np.arange(r.shape[0])
        r[d[live_x], d[live_x]] = 1.0
    return r


def live_units(X, chunk_size: int = 1024) -> np.ndarray:
    """Boolean (p,): units whose value varies over the samples (max != min; O(p) memory)."""
    lo = hi = None
    for s in range(0, X.shape[0], chunk_size):
        x = np.asarray(X[s:s + chunk_size])
        lo = x.min(0) if lo is None else np.minimum(lo, x.min(0))
        hi = x.max(0) if hi is None else np.maximum(hi, x.max(0))
    return hi > lo


def mean_abs(r: np.ndarray, exclude_diagonal: bool = False) -> float:
    """Mean |r| of a correlation matrix; off-diagonal only for a layer with itself."""
    a = np.abs(np.asarray(r, dtype=np.float64))
    if not exclude_diagonal:
        return float(a.mean()) if a.size else 0.0
    k = a.shape[0]
    if k < 2:
        return 0.0
    return float((a.sum() - np.trace(a)) / (k * k - k))
