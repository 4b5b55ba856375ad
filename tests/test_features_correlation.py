"""Chunked Pearson matrices against numpy.corrcoef, and the zero-variance convention."""
import dask.array as da
import numpy as np
import pytest

from dynascope.analysis.correlation import live_units, mean_abs, pearson


def test_equals_corrcoef_across_chunks():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + 1e4
    Y = X[:, :2] @ rng.normal(size=(2, 4)) + rng.normal(size=(50, 4))
    ref = np.corrcoef(X.T, Y.T)
    np.testing.assert_allclose(pearson(X, chunk_size=7), ref[:6, :6], rtol=0, atol=1e-10)
    np.testing.assert_allclose(pearson(X, Y, chunk_size=7), ref[:6, 6:], rtol=0, atol=1e-10)
    np.testing.assert_allclose(pearson(da.from_array(X, chunks=(9, 3)), Y, chunk_size=11), ref[:6, 6:],
                               rtol=0, atol=1e-10)


def test_dead_units_are_zero_and_summaries_finite():
    rng = np.random.default_rng(1)
    X = np.maximum(rng.normal(size=(30, 5)), 0)
    X[:, 2] = 0.0                      # a dead ReLU
    Y = rng.normal(size=(30, 3))
    Y[:, 0] = 4.0                      # a constant unit
    r = pearson(X, chunk_size=4)
    assert r[2].tolist() == [0.0] * 5 and r[:, 2].tolist() == [0.0] * 5
    live = [0, 1, 3, 4]
    np.testing.assert_allclose(r[np.ix_(live, live)], np.corrcoef(X[:, live].T), atol=1e-12)
    rxy = pearson(X, Y)
    assert np.isfinite(rxy).all() and (rxy[:, 0] == 0).all() and (rxy[2] == 0).all()
    assert np.isfinite(mean_abs(rxy)) and np.isfinite(mean_abs(r, exclude_diagonal=True))
    assert live_units(X).tolist() == [True, True, False, True, True]


def test_mean_abs_by_hand():
    r = np.array([[1.0, -0.5, 0.2], [-0.5, 1.0, 0.0], [0.2, 0.0, 1.0]])
    assert mean_abs(r) == pytest.approx((3 + 2 * 0.5 + 2 * 0.2) / 9)
    assert mean_abs(r, exclude_diagonal=True) == pytest.approx((2 * 0.5 + 2 * 0.2) / 6)
    assert mean_abs(np.ones((1, 1)), exclude_diagonal=True) == 0.0


def test_needs_two_samples():
    with pytest.raises(ValueError):
        pearson(np.ones((1, 3)))
