"""Run-level opposing pairs, majority opposition and distributions on a synthetic store,
each against an independent brute force computed from the raw arrays."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

from dynascope import analysis
from dynascope.analysis.run import RunError
from opposing_brute import brute_pairs
from opposing_synth import write_synthetic_run


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return analysis.open_run(write_synthetic_run(tmp_path_factory.mktemp("opp") / "synth.zarr"))


def raw(run, group):
    return {k: np.asarray(v.values) for k, v in run.group(group).data_vars.items()}


KW = dict(cos_threshold=-0.3, magnitude_ratio=2.0, cross_class=True, top_k=3)


def test_probe_pairs_equal_brute_force(synth):
    r = analysis.opposing_pairs(synth, **KW)
    p = raw(synth, "probe")
    ids, tgt = p["example_id"], p["target"]
    want = {}
    for t in range(len(p["step"])):
        G = p["grad_proj"][t].astype(np.float32)
        for (a, b), c in brute_pairs(G, 3, -0.3, labels=tgt, norms=p["grad_norm"][t], ratio=2.0).items():
            want[(t, ids[a], ids[b])] = c
    got = {(t, a, b): c for t, a, b, c in zip(r.at_probe.values, r.example_a.values,
                                              r.example_b.values, r.cosine.values)}
    assert len(want) > 50 and set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=2e-6)
    counts = np.bincount([k[0] for k in want], minlength=len(p["step"]))
    np.testing.assert_array_equal(r.pair_count.values, counts)
    np.testing.assert_array_equal(r.at_step.values, p["step"][r.at_probe.values])
    # the class-pair matrix is symmetric and counts every cross-class pair in both cells
    m = r.class_pair_count.values
    np.testing.assert_array_equal(m, m.T)
    assert m.sum() == 2 * r.sizes["pair"] and np.trace(m) == 0
    assert r.pairs_per_example.sum() == 2 * r.sizes["pair"]
    assert np.all(r.magnitude_ratio <= 2.0) and np.all(r.magnitude_ratio >= 1.0)


def test_train_pairs_equal_brute_force_within_each_batch(synth):
    r = analysis.opposing_pairs(synth, source="train", **KW)
    t = raw(synth, "train")
    want = {}
    for s in range(t["example_id"].shape[0]):
        v = t["example_id"][s] >= 0
        ids = t["example_id"][s][v]
        G = t["grad_proj"][s][v].astype(np.float32)
        got = brute_pairs(G, 3, -0.3, labels=t["target"][s][v], norms=t["grad_norm"][s][v], ratio=2.0)
        for (a, b), c in got.items():
            want[(s, min(ids[a], ids[b]), max(ids[a], ids[b]))] = c
    got = {(s, min(a, b), max(a, b)): c for s, a, b, c in zip(r.at_step.values, r.example_a.values,
                                                             r.example_b.values, r.cosine.values)}
    assert len(want) > 20 and set(got) == set(want)
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=2e-6)
    assert r.attrs["time_dim"] == "step" and r.sizes["step"] == t["example_id"].shape[0]


def test_rerun_with_stricter_parameters_gives_a_subset(synth):
    loose = analysis.opposing_pairs(synth, cos_threshold=-0.2, magnitude_ratio=None, top_k=10)
    strict = analysis.opposing_pairs(synth, cos_threshold=-0.6, magnitude_ratio=1.2, top_k=10)
    key = lambda r: set(zip(r.at_probe.values, r.example_a.values, r.example_b.values))  # noqa: E731
    assert key(strict) < key(loose)
    assert strict.cosine.max() <= -0.6


def test_same_class_pairs_only_when_asked(synth):
    r = analysis.opposing_pairs(synth, cos_threshold=0.0, cross_class=False, top_k=5)
    assert (r.target_a == r.target_b).any()
    r = analysis.opposing_pairs(synth, cos_threshold=0.0, cross_class=True, top_k=5)
    assert not (r.target_a == r.target_b).any()


def test_majority_opposition_equals_loop(synth):
    t = raw(synth, "train")
    res = analysis.majority_opposition(synth, source="train", threshold=0.0)
    for s in (0, 7, t["example_id"].shape[0] - 1):
        v = np.flatnonzero(t["example_id"][s] >= 0)
        G = t["grad_proj"][s].astype(np.float64)
        for i in v:
            others = G[[j for j in v if j != i]].mean(0)
            want = G[i] @ others / np.linalg.norm(G[i]) / np.linalg.norm(others)
            assert res.cosine.values[s, i] == pytest.approx(want, abs=1e-5)
        assert np.isnan(res.cosine.values[s, np.setdiff1d(np.arange(G.shape[0]), v)]).all()
    frac = np.nanmean(np.where(np.isfinite(res.cosine.values), res.cosine.values < 0, np.nan), 1)
    np.testing.assert_allclose(res.opposing_fraction.values, frac, atol=1e-6)
    # per example: the mean over all its presentations
    e = 5
    m = t["example_id"] == e
    assert res.mean_cosine.sel(example=e).item() == pytest.approx(res.cosine.values[m].mean(), abs=1e-6)


def test_majority_opposition_probe_finds_planted(synth):
    res = analysis.majority_opposition(synth, source="probe")
    gt = synth.ground_truth["has_planted_feature"].values[res.example_id.values]
    # the planted examples fight the mean (half go +f, half -f); the others follow it
    assert res.mean_cosine.values[gt].mean() < 0.1 < res.mean_cosine.values[~gt].mean()


def test_loo_cosine_hand_example():
    from dynascope.analysis.opposing import loo_cosine

    G = np.array([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]])
    valid = np.array([[True, True, True, False]])
    c, _ = loo_cosine(G, valid)
    # example 2's others: mean of (1,0),(1,0) -> cos -1; example 0's others: (0,0) -> NaN
    assert c[0, 2] == pytest.approx(-1.0)
    assert np.isnan(c[0, 0]) and np.isnan(c[0, 3])


def test_cosine_histogram_counts_every_pair_once(synth):
    h = analysis.opposing.cosine_histogram(synth, probes=3, bins=40)
    p = raw(synth, "probe")
    G = p["grad_proj"][3].astype(np.float64)
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    iu = np.triu_indices(len(G), 1)
    C = (U @ U.T)[iu]
    same = (p["target"][:, None] == p["target"][None, :])[iu]
    np.testing.assert_array_equal(h.same_class.values, np.histogram(C[same], bins=40, range=(-1, 1))[0])
    np.testing.assert_array_equal(h.cross_class.values, np.histogram(C[~same], bins=40, range=(-1, 1))[0])


def test_loss_change_outliers_robust_z(synth):
    o = analysis.opposing.loss_change_outliers(synth, z=3.0)
    loss = raw(synth, "probe")["loss"].astype(np.float64)
    d = loss[4] - loss[3]
    med = np.median(d)
    z = (d - med) / (1.4826 * np.median(np.abs(d - med)))
    np.testing.assert_allclose(o.z.values[3], z, rtol=1e-5)
    np.testing.assert_array_equal(o.outlier_increase.values[3], z > 3.0)


def test_missing_projections_say_what_to_do(tmp_path):
    path = write_synthetic_run(tmp_path / "r.zarr")
    zarr.open_group(str(path), mode="r+")["probe"].__delitem__("grad_proj")
    with pytest.raises(RunError, match="grad-proj"):
        analysis.opposing_pairs(analysis.open_run(path))
