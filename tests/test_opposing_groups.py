"""Loss-change opposing groups: hand-built pieces (movers, clustering, z-scores) checked
exactly, then the whole method on synthetic stores with and without a planted signal."""
from __future__ import annotations

import numpy as np
import pytest

from dynascope import analysis
from dynascope.analysis.opposing import extreme_movers, robust_z
from dynascope.analysis.opposing.clustering import average_linkage
from opposing_synth import write_synthetic_run


def test_extreme_movers_by_hand():
    delta = np.array([[3.0, -2.0, 0.1, -0.1],
                      [-1.0, 2.0, 0.2, np.nan],
                      [0.5, 0.4, -0.3, -0.2]])
    inc, dec = extreme_movers(delta, top=1)
    np.testing.assert_array_equal(inc, [2, 1, 0, 0])   # 3.0, 2.0, 0.5
    np.testing.assert_array_equal(dec, [1, 1, 1, 0])   # -2.0, -1.0, -0.3
    # a "largest increase" must be an increase: all-negative interval gives none
    inc, _ = extreme_movers(np.array([[-1.0, -2.0]]), top=1)
    np.testing.assert_array_equal(inc, [0, 0])


def test_average_linkage_recovers_blocks():
    sim = np.full((6, 6), -0.2)
    sim[:3, :3] = 0.9
    sim[3:5, 3:5] = 0.8
    sim[2, 3] = sim[3, 2] = 0.7   # one strong cross link: average linkage does not chain on it
    lab = average_linkage(sim, 0.5)
    np.testing.assert_array_equal(lab, [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(average_linkage(sim, 0.95), np.arange(6))
    assert len(np.unique(average_linkage(sim, -1.0))) == 1


def test_robust_z_ignores_outliers():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    z = robust_z(x)
    assert z[2] == 0.0 and z[4] == pytest.approx(97 / 1.4826)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("oppg")
    return {k: analysis.open_run(write_synthetic_run(d / f"{k}.zarr", planted=k)) for k in (8, 0)}


def precision_recall(res, run):
    gt = run.ground_truth["has_planted_feature"].values[res.example_id.values]
    det = res.detected.values
    tp = int((det & gt).sum())
    return tp / max(det.sum(), 1), tp / max(gt.sum(), 1), int(det.sum())


def test_planted_groups_found_exactly(runs):
    run = runs[8]
    res = analysis.opposing_groups(run)
    prec, rec, n = precision_recall(res, run)
    print(f"synthetic planted: precision {prec:.2f} recall {rec:.2f} ({n} detected)")
    assert prec == 1.0 and rec == 1.0
    assert res.sizes["opposition"] == 1
    a, b = int(res.group_a[0]), int(res.group_b[0])
    assert {int(res.group_class[a]), int(res.group_class[b])} == {0, 1}
    assert res.loss_correlation[0] < -0.9 and res.gradient_cosine[0] < -0.5
    # every interval has the two groups trading loss: oscillation is positive throughout
    assert (res.oscillation.values[0] > 0.5).all()
    members = res.member_example_id.values[np.isin(res.member_group.values, [a, b])]
    assert set(members) == set(np.flatnonzero(run.ground_truth["has_planted_feature"].values))


def test_control_run_detects_nothing(runs):
    res = analysis.opposing_groups(runs[0])
    assert res.detected.sum() == 0 and res.sizes["opposition"] == 0


def test_thresholds_are_parameters_not_baked_in(runs):
    # demanding a loss correlation below -1 is impossible: nothing may be reported
    res = analysis.opposing_groups(runs[8], max_loss_correlation=-1.01)
    assert res.sizes["opposition"] == 0 and not res.detected.any()
    # groups larger than the planted ones cannot form
    res = analysis.opposing_groups(runs[8], min_group_size=9)
    assert res.sizes["group"] == 0


def test_weighted_opposition_counts_only_oscillating_intervals():
    from dynascope.analysis.opposing.groups import weighted_opposition

    cos_t = np.array([0.5, 0.5, -1.0, 0.5, 0.9])   # per probe; the last has no interval after it
    ones = np.ones(5)
    d_a = np.array([0.1, 0.1, 1.0, -0.2])          # both fall, both rise, trade, both fall
    d_b = np.array([0.1, 0.1, -1.0, -0.2])
    assert weighted_opposition(cos_t, ones, ones, d_a, d_b) == pytest.approx(-1.0)
    # pull strength weights too: a strong pull at an opposed probe dominates a weak one
    cos_t = np.array([0.8, -0.8, 0.0])
    w = weighted_opposition(cos_t, np.array([0.1, 1.0, 1.0]), np.ones(3),
                            np.array([1.0, 1.0]), np.array([-1.0, -1.0]))
    assert w == pytest.approx((0.8 * 0.1 - 0.8 * 1.0) / 1.1)
    assert np.isnan(weighted_opposition(cos_t, ones[:3], ones[:3], np.ones(2), np.ones(2)))
