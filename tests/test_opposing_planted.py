"""Opposing signals scored on real recorded `planted` runs: the detected opposing groups
against the ground truth `has_planted_feature`, and a control run without the feature."""
from __future__ import annotations

import numpy as np
import pytest

from dynascope import analysis
from dynascope.figures.render import render_figure


@pytest.fixture(scope="module")
def planted(opposing_runs):
    return analysis.open_run(opposing_runs["planted"])


@pytest.fixture(scope="module")
def control(opposing_runs):
    return analysis.open_run(opposing_runs["control"])


def score(run, res):
    gt = run.ground_truth["has_planted_feature"].values[res["example_id"].values]
    det = res["detected"].values
    tp = int((det & gt).sum())
    return tp / max(int(det.sum()), 1), tp / max(int(gt.sum()), 1), int(det.sum()), int(gt.sum())


def test_planted_opposing_groups_precision_recall(planted):
    res = analysis.opposing_groups(planted)
    prec, rec, n, total = score(planted, res)
    print(f"\nplanted run: opposing groups precision {prec:.2f} recall {rec:.2f} "
          f"({n} detected, {total} planted among {res.sizes['example']} tracked)")
    assert prec >= 0.8 and rec >= 0.6
    # the strongest opposing pair of groups is the planted one: classes 0 and 1
    a, b = int(res["group_a"][0]), int(res["group_b"][0])
    assert {int(res["group_class"][a]), int(res["group_class"][b])} == {0, 1}


def test_control_run_yields_few_detections(control):
    res = analysis.opposing_groups(control)
    n = int(res["detected"].sum())
    print(f"\ncontrol run: {n} examples in opposing groups, {res.sizes['opposition']} group pairs")
    assert n <= 5


def test_planted_examples_enrich_the_class0_class1_pairs(planted):
    r = analysis.opposing_pairs(planted, cos_threshold=-0.5, magnitude_ratio=2.0)
    gt = planted.ground_truth["has_planted_feature"].values
    both = gt[r["example_a"].values] & gt[r["example_b"].values]
    # pairs among planted examples are all class 0 vs class 1 (the signal's two sides)
    assert both.any()
    ta, tb = r["target_a"].values[both], r["target_b"].values[both]
    assert set(zip(np.minimum(ta, tb).tolist(), np.maximum(ta, tb).tolist())) == {(0, 1)}


def test_figures_render_on_a_real_run(planted, tmp_path):
    for name in ("opposing_group_trajectories", "opposing_examples_montage", "loss_change_bars"):
        (path,) = render_figure(planted, name, tmp_path)
        assert path.stat().st_size > 10_000


def test_train_pairs_from_the_exact_gram_separate_planted_from_control(planted, control):
    """Within training batches, exact-Gram pairs: the control (no planted signal) finds at
    most a quarter of the planted run's pairs; the sketch, read on the same batches, agrees
    with the Gram on most pairs. At cos <= -0.7: at -0.5 the exact Gram finds ~300 genuine
    pairs in both runs (mislabelled examples and the first steps), which no sketch should
    hide; the plant is what opposes beyond them."""
    kw = dict(source="train", cos_threshold=-0.7, magnitude_ratio=2.0)
    p, c = analysis.opposing_pairs(planted, **kw), analysis.opposing_pairs(control, **kw)
    assert p.attrs["cosine_source"] == c.attrs["cosine_source"] == "exact_gram"
    assert (p["cosine_sd"].values == 0).all()
    ps = analysis.opposing_pairs(planted, cosine_source="sketch", **kw)
    cs = analysis.opposing_pairs(control, cosine_source="sketch", **kw)
    print(f"\ntrain pairs, exact Gram: planted {p.sizes['pair']}, control {c.sizes['pair']}; "
          f"sketch (256): planted {ps.sizes['pair']}, control {cs.sizes['pair']}")
    assert p.sizes["pair"] >= 20
    assert c.sizes["pair"] <= p.sizes["pair"] / 4
    assert ps.attrs["cosine_source"] == "sketch" and (ps["cosine_sd"].values > 0).all()
    key = lambda r: set(zip(r["at_step"].values.tolist(), r["example_a"].values.tolist(),  # noqa: E731
                            r["example_b"].values.tolist()))
    assert len(key(p) & key(ps)) >= 0.8 * p.sizes["pair"]
    assert cs.sizes["pair"] <= ps.sizes["pair"] / 4
