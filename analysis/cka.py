"""Linear centred kernel alignment (CKA) between representations (samples x features).

CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels K = X X^T,
L = Y Y^T (Kornblith et al. 2019). Three estimators, all with bounded memory:

- biased (`debiased=False`): HSIC_0 = tr(K H L H) / (n-1)^2, H the centring matrix;
- debiased (`debiased=True`): the unbiased HSIC_1 of Song et al. (2012);
- minibatch (Nguyen et al. 2021): HSIC_1 averaged over minibatches of the samples, then the
  ratio; for many samples, where n x n Gram matrices do not fit.

Exact forms use n x n Gram matrices (accumulated over feature chunks) when n is moderate,
else feature-space sums (X^T Y, accumulated over sample chunks): never both at full size.
Inputs may be numpy or dask arrays (anything sliceable that np.asarray can load).

A representation with zero variance (a dead layer) carries no information: its CKA with
anything, itself included, is defined as 0 rather than 0/0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _load(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check(X, Y=None):
    if len(X.shape) != 2 or (Y is not None and len(Y.shape) != 2):
        raise ValueError("CKA needs 2-D (samples x features) arrays")
    if Y is not None and X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same samples in both: {X.shape[0]} != {Y.shape[0]}")


def gram(X, feature_chunk: int = 4096) -> np.ndarray:
    """K = X X^T in float64, accumulated over feature chunks (memory n^2 + n*chunk).

    Rows are first shifted by the first row (CKA is shift invariant): constant features then
    contribute exact zeros, so a dead layer's centred Gram is exactly 0, not rounding noise.
    """
    n, p = X.shape
    K = np.zeros((n, n))
    for f in range(0, max(p, 1), feature_chunk):
        Xf = _load(X[:, f:f + feature_chunk])
        Xf = Xf - Xf[:1]
        K += Xf @ Xf.T
    return K


def center_gram(K: np.ndarray, debiased: bool = False) -> np.ndarray:
    """Centred Gram matrix G with <G_K, G_L> = n(n-3) HSIC_1 (debiased) or (n-1)^2 HSIC_0.

    The debiased centring is the one of Kornblith et al.'s reference code: zero the diagonal,
    subtract adjusted row means; it turns the U-statistic into a plain inner product.
    """
    K = np.array(K, dtype=np.float64, copy=True)
    n = K.shape[0]
    if debiased:
        if n < 4:
            raise ValueError(f"the debiased HSIC needs at least 4 samples, got {n}")
        np.fill_diagonal(K, 0.0)
        means = K.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        K -= means[:, None]
        K -= means[None, :]
        np.fill_diagonal(K, 0.0)
        return K
    means = K.mean(axis=0)
    K -= means[:, None]
    K -= means[None, :]
    K += means.mean()
    return K


def unit_gram(X, debiased: bool = False) -> np.ndarray:
    """Centred Gram matrix scaled to unit Frobenius norm (zeros for a constant X), so that
    CKA(X, Y) = <unit_gram(X), unit_gram(Y)>: compute once per representation, reuse per pair."""
    G = center_gram(gram(X), debiased)
    norm = np.sqrt(np.vdot(G, G))
    return G / norm if norm > 0 else np.zeros_like(G)


def _ratio(xy: float, xx: float, yy: float) -> float:
    if xx <= 0 or yy <= 0:
        return 0.0
    return float(xy / np.sqrt(xx * yy))


def _feature_hsics(X, Y, debiased: bool, chunk: int) -> tuple[float, float, float]:
    """(HSIC(X,Y), HSIC(X,X), HSIC(Y,Y)) from feature-space sums over sample chunks.

    With a_i = |x_i|^2, b_i = |y_i|^2, s = sum of rows: tr(KL) = |X^T Y|_F^2,
    1^T K 1 = |s_x|^2, 1^T K L 1 = s_x^T X^T Y s_y, and the zero-diagonal corrections of
    the unbiased form need only sum a_i b_i, X^T b and Y^T a. Rows are shifted by the first
    row first (both estimators are shift invariant): no cancellation from large offsets, and
    constant features are exact zeros.
    """
    n = X.shape[0]
    shift_x = shift_y = None
    acc: dict = {}
    for s in range(0, n, chunk):
        x, y = _load(X[s:s + chunk]), _load(Y[s:s + chunk])
        if shift_x is None:
            shift_x, shift_y = x[0].copy(), y[0].copy()
        x, y = x - shift_x, y - shift_y
        a, b = (x * x).sum(1), (y * y).sum(1)
        parts = {"xy": x.T @ y, "xx": x.T @ x, "yy": y.T @ y, "sx": x.sum(0), "sy": y.sum(0),
                 "ta": a.sum(), "tb": b.sum(), "xa": x.T @ a, "xb": x.T @ b, "ya": y.T @ a,
                 "yb": y.T @ b, "aa": a @ a, "bb": b @ b, "ab": a @ b}
        for k, v in parts.items():
            acc[k] = acc[k] + v if k in acc else v

    def hsic(C, su, sv, ta, tb, ub, va, dab):
        tr = float(np.sum(C * C))
        k1, l1, kl1 = float(su @ su), float(sv @ sv), float(su @ C @ sv)
        if not debiased:
            return (tr - 2.0 / n * kl1 + k1 * l1 / n**2) / (n - 1) ** 2
        tr, k1, l1 = tr - dab, k1 - ta, l1 - tb
        kl1 = kl1 - float(va @ sv) - float(ub @ su) + dab
        return (tr + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))

    g = acc
    xy = hsic(g["xy"], g["sx"], g["sy"], g["ta"], g["tb"], g["xb"], g["ya"], g["ab"])
    xx = hsic(g["xx"], g["sx"], g["sx"], g["ta"], g["ta"], g["xa"], g["xa"], g["aa"])
    yy = hsic(g["yy"], g["sy"], g["sy"], g["tb"], g["tb"], g["yb"], g["yb"], g["bb"])
    return xy, xx, yy


def cka(X, Y, debiased: bool = False, chunk_size: int = 1024, max_gram_samples: int = 4096) -> float:
    """Linear CKA of two (samples x features) arrays over all samples (exact).

    Uses n x n Gram matrices when n <= max_gram_samples or when they are smaller than the
    feature-space sums (p x q); otherwise accumulates X^T Y over chunks of `chunk_size`
    samples. For many samples *and* wide layers use `minibatch_cka`.
    """
    _check(X, Y)
    n, p = X.shape
    q = Y.shape[1]
    if debiased and n < 4:
        raise ValueError(f"the debiased CKA needs at least 4 samples, got {n}")
    if n <= max_gram_samples or n * n <= p * q + p * p + q * q:
        Gx = center_gram(gram(X), debiased)
        Gy = center_gram(gram(Y), debiased)
        return _ratio(float(np.vdot(Gx, Gy)), float(np.vdot(Gx, Gx)), float(np.vdot(Gy, Gy)))
    return _ratio(*_feature_hsics(X, Y, debiased, chunk_size))


def _blocks(n: int, batch_size: int, block_rows: int, seed: int | None):
    """(start, stop, [batch index arrays relative to start]): contiguous blocks of rows are
    loaded once (a dask/zarr read per block, not per batch) and shuffled within the block."""
    rng = None if seed is None else np.random.default_rng(seed)
    block_rows = max(batch_size, block_rows - block_rows % batch_size)
    for s in range(0, n, block_rows):
        e = min(n, s + block_rows)
        order = np.arange(e - s) if rng is None else rng.permutation(e - s)
        batches = [np.sort(order[b:b + batch_size]) for b in range(0, e - s, batch_size)]
        yield s, e, [b for b in batches if len(b) >= 4]  # HSIC_1 needs 4 samples: short tails dropped


def cka_matrix(reps: Sequence, debiased: bool = False, method: str = "auto", batch_size: int = 256,
               max_gram_samples: int = 2048, seed: int | None = None, block_rows: int = 8192) -> np.ndarray:
    """(L, L) linear CKA between every pair of representations with the same samples.

    method: "exact" (all samples; Gram matrices held once per layer, L n^2 floats),
            "minibatch" (Nguyen et al. 2021: per-batch HSIC_1 averaged over batches of
            `batch_size`, L batch^2 floats; always debiased; rows are read in contiguous
            blocks of `block_rows` and, when `seed` is set, shuffled within each block),
            "auto" (exact if n <= max_gram_samples, else minibatch).
    """
    reps = list(reps)
    if not reps:
        return np.zeros((0, 0))
    n = reps[0].shape[0]
    for r in reps:
        _check(reps[0], r)
    if method == "auto":
        method = "exact" if n <= max_gram_samples else "minibatch"
    if method == "exact":
        if n > max_gram_samples:  # Gram matrices would be too large: feature-space pairs
            L = len(reps)
            out = np.eye(L)
            for i in range(L):
                for j in range(i, L):
                    out[i, j] = out[j, i] = cka(reps[i], reps[j], debiased, max_gram_samples=0)
            return out
        G = np.stack([center_gram(gram(r), debiased).ravel() for r in reps])
        return _normalise(G @ G.T)
    if method != "minibatch":
        raise ValueError(f"CKA method must be 'exact', 'minibatch' or 'auto', got {method!r}")
    S = np.zeros((len(reps), len(reps)))
    count = 0
    for start, stop, batches in _blocks(n, batch_size, block_rows, seed):
        if not batches:
            continue
        block = [np.asarray(r[start:stop]) for r in reps]
        for idx in batches:
            m = len(idx)
            G = np.stack([center_gram(gram(b[idx]), debiased=True).ravel() for b in block])
            S += (G @ G.T) / (m * (m - 3))
            count += 1
    if count == 0:
        raise ValueError(f"minibatch CKA needs batches of at least 4 samples (n={n}, batch_size={batch_size})")
    return _normalise(S / count)


def _normalise(S: np.ndarray) -> np.ndarray:
    """S_ij / sqrt(S_ii S_jj). A constant (dead) layer has S_ii = 0 and CKA 0 with every
    layer, as `cka` gives; a layer with NaN/inf activations gets NaN, as `cka` gives, and
    one warning, never a 0 that reads like "unrelated"."""
    d = np.diag(S).copy()
    bad = ~np.isfinite(d)
    ok = (d > 0) & ~bad
    scale = np.where(ok, np.sqrt(np.where(ok, d, 1.0)), 1.0)
    with np.errstate(invalid="ignore"):
        out = S / scale[:, None] / scale[None, :]
    dead = ~ok & ~bad
    out[dead, :] = 0.0
    out[:, dead] = 0.0
    if bad.any():
        import warnings

        warnings.warn(f"CKA: {int(bad.sum())} representation(s) contain NaN/inf activations (indices "
                      f"{np.flatnonzero(bad).tolist()}); their CKA is NaN", stacklevel=3)
        out[bad, :] = np.nan
        out[:, bad] = np.nan
    return out


def minibatch_cka(X, Y, batch_size: int = 256, seed: int | None = None) -> float:
    """Minibatch CKA of one pair (Nguyen et al. 2021): mean_b HSIC_1(K_b, L_b) over minibatches,
    divided by sqrt(mean_b HSIC_1(K_b, K_b) mean_b HSIC_1(L_b, L_b))."""
    return float(cka_matrix([X, Y], method="minibatch", batch_size=batch_size, seed=seed)[0, 1])
