"""Average-linkage agglomerative clustering on a similarity matrix (numpy only; no scipy in
the analysis environment). Used to group extreme-loss-change examples whose gradients point
the same way; candidate sets are small (hundreds), so O(M^3) is milliseconds."""
from __future__ import annotations

import numpy as np


def average_linkage(sim: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster labels 0..K-1: merge the most similar clusters while their average pairwise
    similarity is >= threshold. Labels are ordered by each cluster's smallest member."""
    n = len(sim)
    if n == 0:
        return np.zeros(0, np.int64)
    S = np.array(sim, dtype=np.float64)
    S[~np.isfinite(S)] = -np.inf
    np.fill_diagonal(S, -np.inf)
    size = np.ones(n)
    owner = np.arange(n)
    while True:
        flat = int(np.argmax(S))
        i, j = divmod(flat, n)
        if not S[i, j] >= threshold:
            break
        merged = (size[i] * S[i] + size[j] * S[j]) / (size[i] + size[j])
        S[i], S[:, i] = merged, merged
        S[j], S[:, j] = -np.inf, -np.inf
        S[i, i] = -np.inf
        size[i] += size[j]
        owner[owner == j] = i
    _, labels = np.unique(owner, return_inverse=True)
    return labels.astype(np.int64)
