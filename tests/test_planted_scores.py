"""Example-dynamics scores find the flipped labels of a real recorded `planted` run."""
import numpy as np

from dynascope.analysis import aum, cartography, forgetting, mislabel_detection, open_run
from dynascope.analysis.scoring import auroc


def test_mislabel_auroc(planted_noisy_run):
    run = open_run(planted_noisy_run)
    truth = run.ground_truth["is_mislabeled"].values.astype(bool)
    assert truth.sum() == 50  # 10% of 500 flipped, exactly
    f = forgetting(run, never_learned="inf")
    scores = {
        "forgetting events": auroc(f["forgetting_events"].values, truth[f["example"].values]),
        "AUM (low = flipped)": auroc(-aum(run)["aum"].values, truth),
        "confidence (low = flipped)": auroc(-cartography(run)["confidence"].values, truth),
    }
    print("\nAUROC for finding flipped labels (planted, 500 examples, 12 epochs):")
    for k, v in scores.items():
        print(f"  {k:28s} {v:.3f}")
    assert scores["AUM (low = flipped)"] >= 0.9
    assert scores["confidence (low = flipped)"] >= 0.9
    assert scores["forgetting events"] >= 0.55  # weak in a 12-epoch run, but above chance
    det = mislabel_detection(run)
    got = dict(zip(det["score"].values, det["auroc"].values))
    assert got["aum"] == scores["AUM (low = flipped)"]
    assert got["confidence"] == scores["confidence (low = flipped)"]
    assert got["forgetting_events"] == scores["forgetting events"]


def test_forgetting_consistent_on_recorded_run(planted_noisy_run):
    """Invariants on real data: for a learned example learning - forgetting equals its last
    minus its first correctness (so lies in {-1, 0, 1}); presentations = epochs."""
    run = open_run(planted_noisy_run)
    f = forgetting(run, never_learned="exclude")
    assert (f["presentations"].values == 12).all()
    learned = ~f["never_learned"].values
    diff = f["learning_events"].values[learned] - f["forgetting_events"].values[learned]
    assert set(np.unique(diff)) <= {-1, 0, 1}
    assert np.all(np.isnan(f["forgetting_events"].values[~learned]))
