"""Linear CKA against direct implementations of the formulas (Gram matrices, centring matrix
H, the U-statistic of Song et al. 2012, minibatch averaging of Nguyen et al. 2021)."""
import dask.array as da
import numpy as np
import pytest

from dynascope.analysis.cka import center_gram, cka, cka_matrix, gram, minibatch_cka


def hsic0(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


def hsic1(K, L):
    n = K.shape[0]
    Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def direct_cka(X, Y, hsic=hsic0):
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def data(n=40, p=6, q=9, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) + 3.0           # offsets: centring must matter
    Y = np.tanh(X @ rng.normal(size=(p, q))) + rng.normal(scale=0.5, size=(n, q)) - 2.0
    return X, Y


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("max_gram", [4096, 0])      # Gram route / feature-space route
def test_self_similarity_is_one(debiased, max_gram):
    X, _ = data()
    assert cka(X, X, debiased=debiased, max_gram_samples=max_gram) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("max_gram", [4096, 0])
def test_against_direct_formulas(max_gram):
    X, Y = data()
    got0 = cka(X, Y, max_gram_samples=max_gram, chunk_size=7)
    got1 = cka(X, Y, debiased=True, max_gram_samples=max_gram, chunk_size=7)
    assert got0 == pytest.approx(direct_cka(X, Y, hsic0), rel=1e-11)
    assert got1 == pytest.approx(direct_cka(X, Y, hsic1), rel=1e-11)
    assert abs(got0 - got1) > 1e-3   # the two estimators really differ on 40 samples


def test_centred_gram_inner_products_are_the_hsic_estimators():
    X, Y = data(n=12)
    K, L = gram(X), gram(Y)
    n = 12
    assert np.vdot(center_gram(K), center_gram(L)) / (n - 1) ** 2 == pytest.approx(hsic0(K, L), rel=1e-12)
    assert np.vdot(center_gram(K, True), center_gram(L, True)) / (n * (n - 3)) == pytest.approx(hsic1(K, L), rel=1e-12)


def test_invariances():
    X, Y = data(n=60, p=8)
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    base = cka(X, Y)
    assert cka(X @ Q, Y) == pytest.approx(base, rel=1e-12)
    assert cka(5.3 * X, 0.01 * Y) == pytest.approx(base, rel=1e-12)
    assert cka(X + 100.0, Y) == pytest.approx(base, rel=1e-10)
    assert cka(X + 100.0, Y, debiased=True) == pytest.approx(cka(X, Y, debiased=True), rel=1e-10)
    assert cka(X @ Q, Y, debiased=True) == pytest.approx(cka(X, Y, debiased=True), rel=1e-12)
    A = np.diag(np.geomspace(1.0, 50.0, 8)) @ rng.normal(size=(8, 8))   # invertible, not orthogonal
    assert np.linalg.matrix_rank(A) == 8
    assert abs(cka(X @ A, Y) - base) > 0.01
    assert cka(X @ A, X) < 0.99


def test_minibatch_against_direct_average():
    X, Y = data(n=103, p=5, q=4)
    b = 25   # four batches of 25; the tail of 3 samples is dropped (HSIC_1 needs 4)
    parts = [(X[s:s + b] @ X[s:s + b].T, Y[s:s + b] @ Y[s:s + b].T) for s in range(0, 100, b)]
    xy = np.mean([hsic1(K, L) for K, L in parts])
    xx = np.mean([hsic1(K, K) for K, _ in parts])
    yy = np.mean([hsic1(L, L) for _, L in parts])
    assert minibatch_cka(X, Y, batch_size=b) == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-11)
    blocked = cka_matrix([da.from_array(X, chunks=(10, 5)), Y], method="minibatch", batch_size=b, block_rows=50)
    assert blocked[0, 1] == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-11)   # same batches, read 50 rows at a time
    # one batch holding every sample is the debiased CKA
    assert minibatch_cka(X, Y, batch_size=103) == pytest.approx(cka(X, Y, debiased=True), rel=1e-11)


def test_matrix_matches_pairs_and_accepts_dask():
    X, Y = data(n=30)
    Z = X[:, :3] ** 2
    M = cka_matrix([X, Y, Z])
    for i, A in enumerate([X, Y, Z]):
        for j, B in enumerate([X, Y, Z]):
            assert M[i, j] == pytest.approx(cka(A, B), rel=1e-11)
    Md = cka_matrix([da.from_array(X, chunks=(7, 6)), da.from_array(Y, chunks=(7, 3)), Z])
    np.testing.assert_allclose(Md, M, rtol=1e-12)
    Mf = cka_matrix([X, Y, Z], method="exact", max_gram_samples=0)     # feature-space pairs
    np.testing.assert_allclose(Mf, M, rtol=1e-10)
    Mb = cka_matrix([X, Y, Z], method="minibatch", batch_size=30)
    assert Mb[0, 1] == pytest.approx(cka(X, Y, debiased=True), rel=1e-11)


def test_zero_variance_representation_gives_zero_not_nan():
    X, _ = data()
    dead = np.full((40, 5), 0.7)
    assert cka(X, dead) == 0.0
    assert cka(dead, dead, debiased=True, max_gram_samples=0) == 0.0
    M = cka_matrix([X, dead], method="minibatch", batch_size=10)
    assert np.isfinite(M).all() and M[0, 1] == 0.0 and M[1, 1] == 0.0 and M[0, 0] == pytest.approx(1.0)


def test_rejects_mismatched_samples():
    with pytest.raises(ValueError, match="same samples"):
        cka(np.ones((5, 2)), np.ones((6, 2)))
