"""Opposing signals scored on real recorded `planted` runs: the detected opposing groups
against the ground truth `has_planted_feature`, and a control run without the feature."""
from __future__ import annotations

import numpy as np
import pytest

import analysis
from figures.render import render_figure


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
