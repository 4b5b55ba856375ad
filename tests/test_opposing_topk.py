"""The blockwise top-k pair search equals an independent brute force (full N x N cosine
matrix in float64) exactly, for every block size, k, filter and the dense fallback path."""
from __future__ import annotations

import numpy as np
import pytest

from dynascope.analysis.opposing.topk import most_negative_pairs, within_batch_pairs
from opposing_brute import brute_pairs


def as_dict(ps):
    return {(int(a), int(b)): float(c) for a, b, c in zip(ps.a, ps.b, ps.cosine)}


def planted_matrix(n=240, d=12, pairs=15, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, d))
    idx = rng.permutation(n)[: 2 * pairs].reshape(pairs, 2)
    G[idx[:, 1]] = -G[idx[:, 0]] * rng.uniform(0.6, 1.6, (pairs, 1)) + 0.2 * rng.normal(size=(pairs, d))
    return G.astype(dtype), idx


def check(G, k, block, threshold, **kw):
    got = most_negative_pairs(G, k=k, block=block, threshold=threshold, **kw)
    want = brute_pairs(G, k, threshold, labels=kw.get("labels"), norms=kw.get("norms"),
                       ratio=kw.get("magnitude_ratio"))
    gd = as_dict(got)
    assert set(gd) == set(want)
    np.testing.assert_allclose([gd[p] for p in want], list(want.values()), atol=2e-6)
    assert np.all(np.diff(got.cosine) >= 0)  # sorted, most negative first
    assert np.all(got.a < got.b)
    return got


@pytest.mark.parametrize("block", [1, 7, 64, 239, 240, 1000])
@pytest.mark.parametrize("k", [1, 3])
def test_equals_brute_force_any_block(block, k):
    G, _ = planted_matrix()
    check(G, k, block, None)
    check(G, k, block, -0.3)


def test_filters_equal_brute_force():
    G, _ = planted_matrix(seed=1)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, len(G))
    norms = rng.uniform(0.1, 3.0, len(G))
    check(G, 4, 50, -0.1, labels=labels)
    check(G, 4, 50, None, magnitude_ratio=1.5)
    check(G, 4, 50, -0.1, labels=labels, norms=norms, magnitude_ratio=2.0)


def test_dense_fallback_path_equals_brute_force():
    G, _ = planted_matrix(seed=2)
    labels = np.arange(len(G)) % 3
    check(G, 5, 64, None, max_candidates=1, labels=labels, magnitude_ratio=3.0)
    check(G, 2, 17, -0.2, max_candidates=1)


def test_planted_pairs_found_and_degenerate_rows_skipped():
    G, idx = planted_matrix(seed=3, pairs=10)
    G[5] = 0.0
    G[7] = np.nan
    got = check(G, 1, 32, -0.5)
    found = set(zip(got.a.tolist(), got.b.tolist()))
    planted = {(min(a, b), max(a, b)) for a, b in idx if not {a, b} & {5, 7}}
    assert planted <= found
    assert not {5, 7} & (set(got.a.tolist()) | set(got.b.tolist()))


def test_float16_input():
    G, _ = planted_matrix(seed=4, dtype=np.float16)
    check(G, 3, 100, -0.4)


def test_magnitude_ratio_must_be_a_factor():
    with pytest.raises(ValueError):
        most_negative_pairs(np.ones((3, 2)), magnitude_ratio=0.5)


def test_within_batch_equals_brute_force_per_step():
    rng = np.random.default_rng(5)
    S, B, D = 6, 20, 8
    G = rng.normal(size=(S, B, D)).astype(np.float32)
    G[:, 1] = -G[:, 0]
    valid = np.ones((S, B), bool)
    valid[2, 15:] = False
    labels = rng.integers(0, 3, (S, B))
    norms = rng.uniform(0.5, 2.0, (S, B))
    for kw in ({}, {"labels": labels}, {"labels": labels, "norms": norms, "magnitude_ratio": 1.7}):
        s, a, b, c = within_batch_pairs(G, valid, k=2, threshold=-0.2, **kw)
        for step in range(S):
            v = valid[step]
            sub = dict(k=2, threshold=-0.2, labels=None if "labels" not in kw else labels[step][v],
                       norms=None if "norms" not in kw else norms[step][v], ratio=kw.get("magnitude_ratio"))
            want = brute_pairs(G[step][v], **sub)
            slots = np.flatnonzero(v)
            got = {(int(np.searchsorted(slots, x)), int(np.searchsorted(slots, y))): float(z)
                   for x, y, z in zip(a[s == step], b[s == step], c[s == step])}
            assert set(got) == set(want)
            np.testing.assert_allclose([got[p] for p in want], list(want.values()), atol=2e-6)
        assert (0, 1) in set(zip(a[s == 0].tolist(), b[s == 0].tolist())) or "labels" in kw
