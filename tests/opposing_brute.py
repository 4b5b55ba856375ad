"""Independent brute-force references for the opposing-signal tests (full matrices, loops)."""
from __future__ import annotations

import numpy as np


def brute_pairs(G, k, threshold, labels=None, norms=None, ratio=None):
    """Reference: full cosine matrix, each row's k most negative eligible partners."""
    G = np.asarray(G, dtype=np.float64)
    n = len(G)
    nrm = np.linalg.norm(G, axis=1)
    ok = np.isfinite(nrm) & (nrm > 0)
    U = np.zeros_like(G)
    U[ok] = G[ok] / nrm[ok, None]
    C = U @ U.T
    elig = ok[:, None] & ok[None, :] & ~np.eye(n, dtype=bool)
    if labels is not None:
        elig &= labels[:, None] != labels[None, :]
    if ratio is not None:
        m = nrm if norms is None else norms
        big, small = np.maximum.outer(m, m), np.minimum.outer(m, m)
        with np.errstate(invalid="ignore", divide="ignore"):
            elig &= big <= ratio * small
    if threshold is not None:
        elig &= C <= threshold
    out = {}
    for i in range(n):
        cols = np.flatnonzero(elig[i])
        cols = cols[np.lexsort((cols, C[i, cols]))][:k]
        for j in cols:
            out[(min(i, j), max(i, j))] = C[i, j]
    return out
