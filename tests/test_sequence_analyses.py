"""Example-dynamics analyses on a sequence run, against values computed by hand.

Two sequences of two tokens, vocabulary 2, targets token 0 everywhere; token logits
[a, 0], so a token is right iff a > 0, its margin is a, its target probability sigmoid(a)
and its EL2N sqrt(2) * (1 - sigmoid(a)). One step per epoch, both sequences in it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from dynascope import analysis
from dynascope.cli import main
from dynascope.recorder import Recorder

A = {0: [(1, 1), (-1, -1), (1, 1), (1, -1)],      # token accuracy 1, 0, 1, 0.5
     1: [(-2, -2), (2, -2), (2, 2), (2, 2)]}      # token accuracy 0, .5, 1, 1


def sig(a):
    return 1 / (1 + math.exp(-a))


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("seq") / "lm.zarr"
    model = nn.Linear(2, 2)
    targets = torch.zeros(2, 2, dtype=torch.long)
    with Recorder(path, model, num_classes=2, num_examples=2, task="sequence", param_stats=False) as rec:
        for epoch in range(4):
            a = torch.tensor([A[0][epoch], A[1][epoch]], dtype=torch.float32)   # (B, T)
            logits = torch.stack([a, torch.zeros_like(a)], -1)                    # (B, T, 2)
            with rec.step(example_ids=[0, 1], targets=targets) as step:
                losses = -torch.log_softmax(logits, -1)[..., 0].mean(1)
                step.record(losses=losses, logits=logits)
    return path


def test_forgetting_uses_token_accuracy_threshold(lm_run):
    run = analysis.open_run(lm_run)
    f = analysis.forgetting(run)                       # θ = 0.5: C W C C and W C C C
    np.testing.assert_array_equal(f.forgetting_events, [1, 0])
    np.testing.assert_array_equal(f.learning_events, [1, 1])
    np.testing.assert_array_equal(f.first_learned_step, [0, 1])
    assert f.attrs["correct"] == "token_accuracy >= 0.5"
    f1 = analysis.forgetting(run, correct_threshold=1.0)   # C W C W and W W C C
    np.testing.assert_array_equal(f1.forgetting_events, [2, 0])
    np.testing.assert_array_equal(f1.first_learned_step, [0, 2])
    with pytest.raises(ValueError, match="token accuracy in"):
        analysis.forgetting(run, correct_threshold=2)


def test_cartography_aum_el2n_by_hand(lm_run):
    run = analysis.open_run(lm_run)
    c = analysis.cartography(run)
    conf0 = [sig(1), sig(-1), sig(1), 0.5]
    conf1 = [sig(-2), 0.5, sig(2), sig(2)]
    np.testing.assert_allclose(c.confidence, [np.mean(conf0), np.mean(conf1)], rtol=1e-6)
    np.testing.assert_allclose(c.variability, [np.std(conf0), np.std(conf1)], rtol=1e-5)
    np.testing.assert_allclose(c.correctness, [0.75, 0.75])
    np.testing.assert_allclose(analysis.aum(run).aum, [0.25, 0.5], rtol=1e-6)
    e = analysis.el2n(run)
    np.testing.assert_allclose(e.el2n, [math.sqrt(2) / 2, math.sqrt(2) * (1 - sig(2))], rtol=1e-5)
    e0 = analysis.el2n(run, step=0)
    np.testing.assert_allclose(e0.el2n, [math.sqrt(2) * (1 - sig(1)), math.sqrt(2) * (1 - sig(-2))], rtol=1e-5)


def test_difficulty_and_curves_by_hand(lm_run):
    run = analysis.open_run(lm_run)
    d = analysis.difficulty(run)
    np.testing.assert_allclose(d.accuracy.values, [[1, 0], [0, 1], [1, 1], [1, 1]])   # θ = 0.5
    np.testing.assert_allclose(d.difficulty.sel(epoch=0), [1 - sig(1), 1 - sig(-2)], rtol=1e-6)
    assert "class_loss" not in d                       # a vocabulary is not a set of classes
    c = analysis.epoch_curves(run)
    # token accuracy over all scored tokens: (2 + 0) / 4, (0 + 1) / 4, 4 / 4, (1 + 2) / 4
    np.testing.assert_allclose(c.train_accuracy, [0.5, 0.25, 1.0, 0.75])
    loss0 = (-math.log(sig(1)) - math.log(sig(-2))) / 2
    assert float(c.train_loss[0]) == pytest.approx(loss0, rel=1e-6)


def test_cli_analyze_does_not_abort_on_a_language_model_run(lm_run):
    r = CliRunner().invoke(main, ["analyze", str(lm_run), "--param", "forgetting.correct_threshold=1.0"])
    assert r.exit_code == 0, r.output
    assert "forgetting " in r.output and "mean 1.00 forgetting events" in r.output   # (2 + 0) / 2
    for name in ("cartography", "aum", "el2n", "difficulty", "epoch_curves", "forgetting_timeline"):
        assert f"  {name} " in r.output, name
    r = CliRunner().invoke(main, ["analyze", str(lm_run), "--only", "class_curves", "--only", "opposing_pairs"])
    assert r.exit_code == 0, r.output
    assert "class_curves         skipped: defined for classification runs; this run is sequence" in r.output
    assert "vocabulary 2" in r.output
