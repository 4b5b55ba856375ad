"""Blockwise search for the most negatively aligned pairs of rows of G (N x D).

Never forms the N x N cosine matrix: it walks the upper triangle in (block x block) tiles,
keeps each row's k most negative eligible partners, and so needs O(N k + block^2) memory
whatever N is. Each unordered pair's cosine is computed once (tile I <= J), which halves the
work of a dense G @ G.T and makes (a, b) and (b, a) carry the identical float.

Semantics (what the brute-force tests check): a pair {a, b} is returned iff it is eligible
(a != b, both rows finite and non-zero, optionally different labels, optionally norms within
a factor `magnitude_ratio`), its cosine is <= `threshold`, and b is among a's k most negative
eligible partners or a among b's (ties broken by the smaller index).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PairSet:
    """Unordered pairs (a < b) sorted by cosine, then (a, b)."""

    a: np.ndarray        # (M,) int64 row indices
    b: np.ndarray        # (M,) int64
    cosine: np.ndarray   # (M,) float32

    def __len__(self) -> int:
        return len(self.a)


def unit_rows(G, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """float32 unit rows of G and their norms (0 rows and non-finite rows become zero)."""
    n = G.shape[0]
    U = np.empty(G.shape, dtype=np.float32)
    norms = np.empty(n, dtype=np.float32)
    for s in range(0, n, chunk):
        x = np.asarray(G[s:s + chunk], dtype=np.float32)
        nrm = np.sqrt(np.einsum("ij,ij->i", x, x))
        ok = np.isfinite(nrm) & (nrm > 0)
        nrm = np.where(ok, nrm, 0).astype(np.float32)
        U[s:s + chunk] = np.where(ok[:, None], x / np.where(ok, nrm, 1)[:, None], 0)
        norms[s:s + chunk] = np.where(ok, nrm, np.nan)
    return U, norms


class _TopK:
    """Per-row k smallest (value, column) seen so far, ordered by (value, column)."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.val = np.full((n, k), np.inf, dtype=np.float32)
        self.idx = np.full((n, k), -1, dtype=np.int64)
        self.kth = np.full(n, np.inf, dtype=np.float32)  # current admission bound per row

    def merge(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if rows.size == 0:
            return
        u = np.unique(rows)
        old_v, old_c = self.val[u], self.idx[u]
        keep = old_c >= 0
        r = np.concatenate([rows, np.repeat(u, self.k)[keep.ravel()]])
        c = np.concatenate([cols, old_c[keep]])
        v = np.concatenate([vals, old_v[keep]])
        order = np.lexsort((c, v, r))
        r, c, v = r[order], c[order], v[order]
        start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        rank = np.arange(len(r)) - np.repeat(start, np.diff(np.r_[start, len(r)]))
        sel = rank < self.k
        self.val[u] = np.inf
        self.idx[u] = -1
        self.val[r[sel], rank[sel]] = v[sel]
        self.idx[r[sel], rank[sel]] = c[sel]
        self.kth[u] = self.val[u, self.k - 1]


def _eligible(r, c, valid, labels, norms, log_ratio):
    ok = valid[r] & valid[c]
    if labels is not None:
        ok &= labels[r] != labels[c]
    if log_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ok &= np.abs(np.log(norms[r]) - np.log(norms[c])) <= log_ratio
    return ok


def most_negative_pairs(G, k: int = 5, block: int = 4096, threshold: float | None = -0.5,
                        labels=None, norms=None, magnitude_ratio: float | None = None,
                        max_candidates: int | None = None) -> PairSet:
    """The pairs of rows of G (N x D, any float dtype) with the most negative cosines.

    k: partners kept per row (memory N*k). block: tile size (memory ~ 4*block^2 bytes per
    tile). threshold: only cosines <= threshold (None: no bound, pure top-k). labels: if
    given, only pairs with different labels (cross-class). norms: magnitudes for the ratio
    test (default: the rows' own norms). magnitude_ratio: keep pairs with
    max(norm)/min(norm) <= magnitude_ratio, i.e. both pull comparably (None: no test).
    """
    if k < 1 or block < 1:
        raise ValueError("k and block must be at least 1")
    U, own = unit_rows(G)
    n = U.shape[0]
    valid = own > 0  # NaN compares False
    labels = None if labels is None else np.asarray(labels)
    if magnitude_ratio is not None:
        if magnitude_ratio < 1:
            raise ValueError(f"magnitude_ratio must be >= 1 (a factor), got {magnitude_ratio}")
        norms = own if norms is None else np.asarray(norms, dtype=np.float64)
        valid = valid & np.isfinite(norms) & (norms > 0)
        log_ratio = float(np.log(magnitude_ratio))
    else:
        norms, log_ratio = None, None
    thr = np.float32(np.inf if threshold is None else threshold)
    top = _TopK(n, k)
    cap = max_candidates or max(4 * block * k, 1 << 16)
    buf = np.empty((min(block, n), min(block, n)), dtype=np.float32)
    for i0 in range(0, n, block):
        I = slice(i0, min(i0 + block, n))
        for j0 in range(i0, n, block):
            J = slice(j0, min(j0 + block, n))
            C = np.matmul(U[I], U[J].T, out=buf[: I.stop - I.start, : J.stop - J.start])
            diag = i0 == j0  # on a diagonal tile only c > r is used: each pair once
            cut = min(thr, max(top.kth[I].max(), top.kth[J].max()))
            mask = C <= cut
            cand = np.count_nonzero(mask)
            if cand == 0:
                continue
            if cand > cap:
                _partition_tile(top, C, I, J, diag, valid, labels, norms, log_ratio, thr)
                continue
            lr, lc = np.divmod(np.flatnonzero(mask), C.shape[1])
            if diag:
                lr, lc = lr[lr < lc], lc[lr < lc]
            v = C[lr, lc]
            r, c = lr + i0, lc + j0
            ok = _eligible(r, c, valid, labels, norms, log_ratio)
            r, c, v = r[ok], c[ok], v[ok]
            # row side (row r in I) and column side (row c in J): each against its own bound
            a = v <= np.minimum(top.kth[r], thr)
            b = v <= np.minimum(top.kth[c], thr)
            top.merge(np.concatenate([r[a], c[b]]), np.concatenate([c[a], r[b]]),
                      np.concatenate([v[a], v[b]]))
    return _collect(top)


def _partition_tile(top: _TopK, C, I, J, diag, valid, labels, norms, log_ratio, thr) -> None:
    """Dense fallback for a tile with many candidates: each row's k best via argpartition."""
    rows = np.arange(I.start, I.stop)
    cols = np.arange(J.start, J.stop)
    M = C.copy()
    bad = ~(valid[rows][:, None] & valid[cols][None, :])
    if diag:
        bad |= ~np.triu(np.ones(C.shape, dtype=bool), 1)
    if labels is not None:
        bad |= labels[rows][:, None] == labels[cols][None, :]
    if log_ratio is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            bad |= np.abs(np.log(norms[rows])[:, None] - np.log(norms[cols])[None, :]) > log_ratio
    M[bad | (M > thr)] = np.inf
    for mat, rr, cc in ((M, rows, cols), (M.T, cols, rows)):
        kk = min(top.k, mat.shape[1])
        part = np.argpartition(mat, kk - 1, axis=1)[:, :kk] if kk < mat.shape[1] else \
            np.broadcast_to(np.arange(mat.shape[1]), mat.shape)
        v = np.take_along_axis(mat, part, 1)
        # a tie at the k-th value could straddle the partition: take every column that ties it
        kth = v.max(1)
        lr, lc = np.nonzero((mat <= kth[:, None]) & np.isfinite(mat))
        top.merge(rr[lr], cc[lc], mat[lr, lc])


def _collect(top: _TopK) -> PairSet:
    r, slot = np.nonzero(top.idx >= 0)
    c = top.idx[r, slot]
    v = top.val[r, slot]
    a, b = np.minimum(r, c), np.maximum(r, c)
    key = a * (top.idx.shape[0] + 1) + b
    _, first = np.unique(key, return_index=True)
    a, b, v = a[first], b[first], v[first]
    order = np.lexsort((b, a, v))
    return PairSet(a=a[order], b=b[order], cosine=v[order])


def within_batch_pairs(G, valid, k: int = 5, threshold: float | None = -0.5, labels=None,
                       norms=None, magnitude_ratio: float | None = None):
    """Same semantics as most_negative_pairs, independently inside each batch of G (S, B, D).

    Returns (step, slot_a, slot_b, cosine) arrays. Batches are small, so each is a dense
    B x B tile; steps are processed together.
    """
    G = np.asarray(G, dtype=np.float32)
    nrm = np.sqrt(np.einsum("sbd,sbd->sb", G, G))
    ok = np.asarray(valid, bool) & np.isfinite(nrm) & (nrm > 0)
    U = np.where(ok[..., None], G / np.where(ok, nrm, 1)[..., None], 0).astype(np.float32)
    C = U @ U.transpose(0, 2, 1)
    return within_batch_pairs_from_cosines(C, ok, k, threshold, labels,
                                           nrm if norms is None else norms, magnitude_ratio)


def within_batch_pairs_from_cosines(C, ok, k: int = 5, threshold: float | None = -0.5, labels=None,
                                    norms=None, magnitude_ratio: float | None = None):
    """within_batch_pairs from cosines C (S, B, B) (e.g. an exact Gram) and valid rows ok."""
    C = np.asarray(C, dtype=np.float32)
    S, B, _ = C.shape
    ok = np.asarray(ok, bool)
    iu = np.triu(np.ones((B, B), bool), 1)
    C = np.where(iu, C, np.swapaxes(C, 1, 2))  # exact symmetry: one float per pair
    good = ok[:, :, None] & ok[:, None, :] & ~np.eye(B, dtype=bool)
    if labels is not None:
        lab = np.asarray(labels)
        good &= lab[:, :, None] != lab[:, None, :]
    if magnitude_ratio is not None:
        m = np.asarray(norms, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            lm = np.log(m)
        good &= np.abs(lm[:, :, None] - lm[:, None, :]) <= np.log(magnitude_ratio)
    if threshold is not None:
        good &= C <= threshold
    M = np.where(good, C, np.inf)
    kk = min(k, B)
    order = np.argsort(M, axis=2, kind="stable")[:, :, :kk]
    sel = np.zeros_like(good)
    np.put_along_axis(sel, order, True, axis=2)
    sel &= good
    pair = (sel | np.swapaxes(sel, 1, 2)) & iu
    s, a, b = np.nonzero(pair)
    return s, a, b, C[s, a, b]
