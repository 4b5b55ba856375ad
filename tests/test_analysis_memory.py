"""The streamed (blockwise) per-example analyses equal the gathered implementations exactly,
on recorded runs and on a store built to hit the edge cases: an example twice in one step,
padding, steps without logits, an example whose only presentations have no logits, and
blocks far smaller than the run (many carries across block boundaries)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from dynascope import analysis
from dynascope.analysis import blockwise
from dynascope.analysis.difficulty import _at_step, _mean_std
from dynascope.analysis.forgetting import _correct_sequences, _first_min, forgetting_counts
from dynascope.analysis.sequences import gather, per_example, time_table
from dynascope.recorder import Recorder


# -- the gathered implementations (the code the streamed passes replaced) -------------------
def ref_forgetting(run, never_learned="presentations"):
    seq, correct = _correct_sequences(run, "train")
    stats = forgetting_counts(seq.index, correct, seq.step, seq.num_examples, never_learned)
    stats["first_learned_step"] = _first_min(seq.index, seq.step, correct, seq.num_examples)
    stats["first_learned_epoch"] = _first_min(seq.index, seq.epoch, correct, seq.num_examples)
    return per_example(seq, stats, {"never_learned": never_learned})


def ref_cartography(run):
    seq = gather(run, "train", scores=("p_gold", "correct"))
    conf, var = _mean_std(seq, seq.scores["p_gold"])
    corr, _ = _mean_std(seq, seq.scores["correct"])
    return per_example(seq, {"confidence": conf, "variability": var, "correctness": corr,
                             "presentations": seq.counts()})


def ref_aum(run):
    seq = gather(run, "train", scores=("margin",))
    mean, _ = _mean_std(seq, seq.scores["margin"])
    return per_example(seq, {"aum": mean, "presentations": seq.counts()})


def ref_el2n(run, step=None):
    seq = gather(run, "train", scores=("el2n",))
    score, at = _at_step(seq, "el2n", step)
    return per_example(seq, {"el2n": score, "score_step": at}, {"step": -1 if step is None else int(step)})


def ref_epoch_tables(run, names):
    seq = gather(run, "train", scores=names)
    out = {}
    for n in names:
        bins, out[n] = time_table(seq, seq.scores[n], "epoch")
    return seq, bins, out


def _strip(ds):
    ds = ds.copy()
    for v in ds.variables.values():
        v.attrs = {}
    return ds


def assert_streamed_equals_gathered(run):
    pairs = [
        (analysis.forgetting(run), ref_forgetting(run)),
        (analysis.forgetting(run, never_learned="inf"), ref_forgetting(run, "inf")),
        (analysis.forgetting(run, never_learned="exclude"), ref_forgetting(run, "exclude")),
        (analysis.cartography(run), ref_cartography(run)),
        (analysis.aum(run), ref_aum(run)),
        (analysis.el2n(run), ref_el2n(run)),
        (analysis.el2n(run, step=3), ref_el2n(run, 3)),
    ]
    for new, old in pairs:
        xr.testing.assert_identical(_strip(new), _strip(old))
    seq, bins, tables = ref_epoch_tables(run, ("loss", "p_gold", "correct"))
    d = analysis.difficulty(run)
    np.testing.assert_array_equal(d.epoch, bins)
    np.testing.assert_array_equal(d.example, seq.examples)
    np.testing.assert_array_equal(d.target, seq.target)
    np.testing.assert_array_equal(d.loss, tables["loss"].astype(np.float32))
    np.testing.assert_array_equal(d.difficulty, (1 - tables["p_gold"]).astype(np.float32))
    np.testing.assert_array_equal(d.accuracy, tables["correct"].astype(np.float32))
    lt = analysis.loss_trajectories(run, source="train")
    np.testing.assert_array_equal(lt.loss, tables["loss"].astype(np.float32))
    np.testing.assert_array_equal(lt.example_id, seq.examples)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "BLOCK_CELLS", 1)   # one zarr chunk per block


def test_streamed_equals_gathered_on_recorded_runs(tiny_run, planted_noisy_run, small_blocks):
    for path in (tiny_run, planted_noisy_run):
        assert_streamed_equals_gathered(analysis.open_run(path))


def test_streamed_equals_gathered_with_default_blocks(planted_noisy_run):
    assert_streamed_equals_gathered(analysis.open_run(planted_noisy_run))


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """Hand-made presentations: example 3 in consecutive steps (an id twice in one batch is
    an error), short padded batches, steps 4 and
    9 without logits, example 7 seen only in step 4; 2-step chunks."""
    path = tmp_path_factory.mktemp("edge") / "edge.zarr"
    g = torch.Generator().manual_seed(3)
    batches = [[0, 1, 2, 3], [3, 4, 2, 5], [6, 0], [1, 2, 4, 5], [7, 6, 0], [3, 1, 2],
               [5, 4, 6], [0, 3], [2, 1, 5, 4], [6, 0, 3]]
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with Recorder(path, nn.Linear(1, 3), num_classes=3, num_examples=8, chunk_steps=2,
                  param_stats=False) as rec:
        for s, ids in enumerate(batches):
            ids = torch.tensor(ids)
            logits = torch.randn(len(ids), 3, generator=g) * 2
            with rec.step(example_ids=ids, targets=targets[ids], epoch=s // 3) as step:
                step.record(losses=F.cross_entropy(logits, targets[ids], reduction="none"),
                            logits=None if s in (4, 9) else logits)
    return path


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")   # epoch 3 has no logits at all
def test_streamed_equals_gathered_on_edge_cases(edge_run, small_blocks):
    run = analysis.open_run(edge_run)
    f = analysis.forgetting(run)
    assert 7 in f.example.values and int(f.presentations.sel(example=7)) == 0   # seen, never scored
    assert_streamed_equals_gathered(run)
