"""Feature-signal analyses on tiny hand-built stores (no torch): layer correlation and CKA
per probe against numpy, drift, intra-layer heatmaps, and the augmentation variance ratio
against a hand-computed example."""
import numpy as np
import pytest
import zarr

from dynascope.analysis import features as F
from dynascope.analysis.augmentation import augmentation_invariance, view_correlation
from dynascope.analysis.run import open_run


def _arr(g, name, data, dims):
    data = np.asarray(data)
    a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape, dimension_names=list(dims))
    a[...] = data


def make_run(path, acts=None, aug=None, targets=None):
    """acts: {layer: (probe, example, unit)}; aug: {layer: ((sample, aug, unit), (reference, unit))}."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    P = next(iter(acts.values())).shape[0] if acts else 0
    N = next(iter(acts.values())).shape[1] if acts else 0
    root.attrs.update({"dynascope": {"schema_version": 1}, "status": "complete",
                       "committed": {"probe": P, "activations": P},
                       "dataset": {"num_classes": 3, "class_names": ["a", "b", "c"]},
                       "extensions": {"activations": {"layers": list(acts or {})}}})
    if acts:
        pr = root.create_group("probe")
        _arr(pr, "example_id", np.arange(N) * 10, ("example",))
        _arr(pr, "target", np.asarray(targets if targets is not None else np.arange(N) % 3), ("example",))
        _arr(pr, "step", np.arange(P) * 5, ("probe",))
        _arr(pr, "epoch", np.arange(P) - 1, ("probe",))
        g = root.create_group("activations")
        for name, x in acts.items():
            _arr(g, name, np.asarray(x, np.float32), ("probe", "example", f"{name}__unit"))
    if aug:
        g = root.create_group("augmentation")
        g.attrs.update({"layers": list(aug), "n_aug": next(iter(aug.values()))[0].shape[1]})
        for name, (views, clean) in aug.items():
            _arr(g, name, np.asarray(views, np.float32), ("sample", "aug", f"{name}__unit"))
            _arr(g, f"{name}__clean", np.asarray(clean, np.float32), ("reference", f"{name}__unit"))
        S = next(iter(aug.values()))[0].shape[0]
        _arr(g, "sample_id", np.arange(S) + 100, ("sample",))
    return open_run(path)


def corr0(X, Y):
    """numpy.corrcoef with the documented convention: zero-variance units give r = 0."""
    p = X.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(X.T, Y.T)[:p, p:]
    return np.nan_to_num(r, nan=0.0)


def linear_cka(X, Y):
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Xc.T @ Yc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))


@pytest.fixture
def acts():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 30, 4))
    b = np.maximum(a @ rng.normal(size=(4, 5)), 0)
    b[..., 1] = 0.0                                          # a dead ReLU unit
    c = np.tanh(b @ rng.normal(size=(5, 3))) + rng.normal(scale=0.1, size=(3, 30, 3))
    return {"fc1": a.astype(np.float32), "relu1": b.astype(np.float32), "out": c.astype(np.float32)}


def test_layer_correlation_matches_numpy(tmp_path, acts):
    run = make_run(tmp_path / "r.zarr", acts)
    res = F.layer_correlation(run, chunk_size=7)
    names = list(acts)
    assert list(res["layer_a"].values) == names and res["step"].values.tolist() == [0, 5, 10]
    for k in range(3):
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                X, Y = acts[a][k].astype(np.float64), acts[b][k].astype(np.float64)
                r = np.abs(corr0(X, Y))
                want = (r.sum() - np.trace(r)) / (r.size - len(r)) if i == j else r.mean()
                assert res["mean_abs_r"].values[k, i, j] == pytest.approx(want, abs=1e-12)
    assert np.isfinite(res["mean_abs_r"]).all()
    assert res["live_fraction"].values[:, 1].tolist() == [0.8, 0.8, 0.8]


def test_cka_and_drift(tmp_path, acts):
    run = make_run(tmp_path / "r.zarr", acts)
    res = F.layer_cka(run, probes=[0, -1])
    assert res["probe"].values.tolist() == [0, 2]
    want = linear_cka(acts["fc1"][2].astype(float), acts["out"][2].astype(float))
    assert res["cka"].sel(layer_a="fc1", layer_b="out").values[1] == pytest.approx(want, rel=1e-6)
    drift = F.representation_drift(run)
    assert np.allclose(drift["cka_to_reference"].values[-1], 1.0)
    assert np.isnan(drift["cka_to_previous"].values[0]).all()
    want = linear_cka(acts["relu1"][0].astype(float), acts["relu1"][1].astype(float))
    assert drift["cka_to_previous"].sel(layer="relu1").values[1] == pytest.approx(want, rel=1e-6)
    big = F.representation_drift(run, max_gram_samples=0)                # feature-space route
    np.testing.assert_allclose(big["cka_to_reference"].values, drift["cka_to_reference"].values, rtol=1e-9)
    np.testing.assert_allclose(big["cka_to_previous"].values, drift["cka_to_previous"].values, rtol=1e-9)


def test_intra_layer_heatmaps(tmp_path, acts):
    run = make_run(tmp_path / "r.zarr", acts, targets=[2, 0, 1] * 10)
    ff = F.feature_correlation(run, "relu1", probe=1)
    X = acts["relu1"][1].astype(float)
    np.testing.assert_allclose(ff.values, corr0(X, X), atol=1e-12)
    assert ff.values[1, 1] == 0.0 and np.isfinite(ff.values).all()
    ss = F.sample_correlation(run, "out", probe=-1, max_examples=12)
    assert ss.shape == (12, 12) and (np.diff(ss["target"].values) >= 0).all()
    X = acts["out"][2][ss["example_id"].values // 10].astype(float)
    np.testing.assert_allclose(ss.values, np.corrcoef(X), atol=1e-12)
    with pytest.raises(Exception, match="not recorded"):
        F.feature_correlation(run, "conv9")


def test_correlation_blocks_upper_triangle(tmp_path, acts):
    run = make_run(tmp_path / "r.zarr", acts)
    blocks = F.correlation_blocks(run, probe=0, max_units=3)
    assert set(blocks) == {("fc1", "fc1"), ("fc1", "relu1"), ("fc1", "out"), ("relu1", "relu1"),
                           ("relu1", "out"), ("out", "out")}
    assert blocks[("fc1", "relu1")].shape == (3, 3)   # units evenly subsampled 4 -> 3, 5 -> 3


def test_augmentation_ratio_by_hand(tmp_path):
    views = np.zeros((2, 3, 2))
    views[0, :, 0] = [1, 2, 3]        # var 1
    views[1, :, 1] = [1, 3, 5]        # var 4
    views[1, :, 0] = 2.0              # constant over views
    clean = np.array([[0, 5], [2, 5], [4, 5], [6, 5]], float)   # unit 0: var 20/3; unit 1 dead
    dead = (np.ones((2, 3, 2)), np.ones((4, 2)))
    run = make_run(tmp_path / "a.zarr", aug={"l1": (views, clean), "dead": dead})
    res = augmentation_invariance(run)
    assert res["within_var"].sel(layer="l1").values.tolist() == [1.0, 4.0]
    assert res["across_var"].sel(layer="l1").item() == pytest.approx(20 / 3)
    assert res["ratio_per_sample"].sel(layer="l1").values == pytest.approx([0.15, 0.6])
    assert res["ratio"].sel(layer="l1").item() == pytest.approx(0.375)
    assert np.isnan(res["ratio"].sel(layer="dead").item())          # documented: constant layer
    assert res["sample_id"].values.tolist() == [100, 101]
    vc = view_correlation(run, "l1", views_per_sample=3)
    assert vc.shape == (6, 6) and vc["sample_id"].values.tolist() == [100] * 3 + [101] * 3
