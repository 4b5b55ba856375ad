"""AUROC (rank-based Mann-Whitney) against hand-computed values and the pairwise definition."""
import numpy as np
import pytest

from dynascope.analysis import auroc


def test_hand_computed():
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered -> 0.75
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75


def test_ties_count_half():
    # positives {1, 2} vs negative {1}: tie (0.5) + win (1) over 2 pairs
    assert auroc([1, 1, 2], [0, 1, 1]) == 0.75
    assert auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5


def test_perfect_inverted_and_inf():
    assert auroc([np.inf, 3, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0


def test_nan_dropped_and_degenerate():
    with pytest.warns(UserWarning, match="dropped 1 of 3 examples whose score is NaN"):
        assert auroc([np.nan, 0.2, 0.9], [0, 0, 1]) == 1.0
    with pytest.warns(UserWarning):
        assert auroc([np.nan, 0.2, 0.9, np.nan], [1, 0, 1, 0], return_counts=True) == (1.0, 2, 2)
    assert np.isnan(auroc([1, 2], [1, 1]))
    with pytest.raises(ValueError):
        auroc([1, 2, 3], [1, 0])


def test_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 200).astype(float)  # many ties
    y = rng.random(200) < 0.3
    pos, neg = s[y], s[~y]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(pairwise, abs=1e-12)
