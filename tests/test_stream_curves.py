"""difficulty, loss_trajectories(source="train") and class_curves stream over step blocks and
equal a plain numpy computation on the fully loaded train table: the per-(epoch, example)
tables exactly, the class and overall means exactly against the previous whole-table
expressions, and class_curves to float64 rounding (it now accumulates in float64; the
previous per-step xarray sums accumulated float32, within 1e-6 of it)."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from dynascope import analysis
from dynascope.analysis import blockwise
from dynascope.recorder import Recorder

difficulty_module = importlib.import_module("dynascope.analysis.difficulty")   # the package exports the function
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore:Mean of empty slice:RuntimeWarning")


def _table(path):
    t = xr.open_zarr(path, group="train").load()
    return (t.example_id.values, t.target.values, t.loss.values, t.logits.values.astype(np.float64),
            t.epoch.values)


def _scores(logits, target):
    """float32 p(gold) and correctness of every cell; NaN without logits (the recorded scores)."""
    valid = ~np.isnan(logits).any(-1) & (target >= 0)
    z = np.where(valid[..., None], logits, 0.0)
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    t = np.where(valid, target, 0)
    pg = np.take_along_axis(p, t[..., None], -1)[..., 0]
    ok = z.argmax(-1) == t
    return (np.where(valid, pg, np.nan).astype(np.float32), np.where(valid, ok, np.nan).astype(np.float32))


def reference_epoch_tables(path):
    """(epochs, example ids, latest targets, {name: (epoch, example) float64 mean})."""
    ids, target, loss, logits, epoch = _table(path)
    pg, ok = _scores(logits, target)
    cell = ids >= 0
    examples = np.unique(ids[cell])
    epochs = np.unique(np.broadcast_to(epoch[:, None], ids.shape)[cell])
    latest = {}
    for i, t in zip(ids[cell], target[cell]):   # row-major: the last presentation wins
        latest[i] = t
    col = np.searchsorted(examples, ids)
    row = np.searchsorted(epochs, np.broadcast_to(epoch[:, None], ids.shape))
    out = {}
    for name, vals in (("loss", loss), ("p_gold", pg), ("correct", ok)):
        total = np.zeros((len(epochs), len(examples)))
        count = np.zeros((len(epochs), len(examples)))
        m = cell & ~np.isnan(vals)
        np.add.at(total, (row[m], col[m]), vals[m].astype(np.float64))
        np.add.at(count, (row[m], col[m]), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = total / count
    return epochs, examples, np.array([latest[i] for i in examples]), out


def previous_class_means(table, target, classes):
    """The whole-table expressions difficulty used before it worked in groups of rows."""
    onehot = (target[:, None] == classes[None, :]).astype(np.float64)
    vals = table.astype(np.float64)
    have = ~np.isnan(vals)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = (np.where(have, vals, 0) @ onehot) / (have @ onehot)
    return per_class.astype(np.float32), np.nanmean(np.where(have, vals, np.nan), axis=1).astype(np.float32)


def reference_class_curves(path, classes):
    ids, target, loss, logits, epoch = _table(path)
    _, ok = _scores(logits, target)
    epochs = np.unique(epoch)
    shape = (len(epochs), len(classes))
    s = {n: np.zeros(shape) for n in ("count", "loss", "nonfinite", "correct", "unknown")}
    for r, e in enumerate(epochs):
        for k in classes:
            m = (ids >= 0) & (target == k) & (epoch[:, None] == e)
            fin = m & np.isfinite(loss)
            s["count"][r, k], s["nonfinite"][r, k] = m.sum(), (m & ~fin).sum()
            s["loss"][r, k] = loss[fin].astype(np.float64).sum()
            s["correct"][r, k] = np.nansum(ok[m].astype(np.float64))
            s["unknown"][r, k] = np.isnan(ok[m]).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        loss_mean = np.where(s["nonfinite"] == 0, s["loss"] / s["count"], np.nan)
        acc = np.where(s["unknown"] == 0, s["correct"] / s["count"], np.nan)
    return epochs, loss_mean, acc


def previous_class_curves(run, classes):
    """The per-step xarray sums class_curves used before (float32 accumulation)."""
    from dynascope.analysis.run import correct

    train = run.train
    onehot = (train["target"] == xr.DataArray(classes, dims="class_id")) & (train["example_id"] >= 0)
    ok = correct(train["logits"], train["target"])
    per_step = xr.Dataset({"loss_sum": train["loss"].where(onehot).sum("slot"),
                           "correct_sum": ok.where(onehot).sum("slot"), "count": onehot.sum("slot"),
                           "nonfinite": (onehot & ~np.isfinite(train["loss"])).sum("slot"),
                           "unknown": (onehot & ok.isnull()).sum("slot")}
                          ).assign_coords(epoch=train["epoch"]).compute()
    sums = per_step.groupby("epoch").sum()
    return ((sums["loss_sum"] / sums["count"]).where(sums["nonfinite"] == 0).values,
            (sums["correct_sum"] / sums["count"]).where(sums["unknown"] == 0).values)


def previous_epoch_curves(run):
    """The whole-table per-step dask sums epoch_curves used before (train columns only)."""
    from dynascope.analysis.curves import valid_mask
    from dynascope.analysis.run import correct

    train = run.train
    valid = valid_mask(train)
    per_step = xr.Dataset({"loss_sum": train["loss"].where(valid).sum("slot"), "count": valid.sum("slot"),
                           "nonfinite": (valid & ~np.isfinite(train["loss"])).sum("slot"), "lr": train["lr"]})
    ok = correct(train["logits"], train["target"])
    per_step["correct_sum"] = ok.sum("slot")
    per_step["unknown"] = (valid & ok.isnull()).sum("slot")
    per_step = per_step.assign_coords(epoch=train["epoch"]).compute()
    grouped = per_step.groupby("epoch")
    sums = grouped.sum()
    return xr.Dataset({"train_loss": (sums["loss_sum"] / sums["count"]).where(sums["nonfinite"] == 0),
                       "train_nonfinite_loss": sums["nonfinite"], "lr": grouped.last()["lr"],
                       "steps": per_step["count"].groupby("epoch").count(),
                       "train_accuracy": (sums["correct_sum"] / sums["count"]).where(sums["unknown"] == 0)})


@pytest.fixture(scope="module")
def edge_run(tmp_path_factory):
    """Padding (short batches), steps without logits (4, 9), a NaN loss (step 6), class 3
    absent from epoch 1, an epoch that ends inside a chunk, example 7 seen once; 2-step chunks."""
    path = tmp_path_factory.mktemp("edge") / "edge.zarr"
    g = torch.Generator().manual_seed(5)
    batches = [[0, 1, 2, 3], [3, 4, 2, 5], [6, 0], [1, 2, 4, 5], [7, 6, 0], [1, 2, 5],
               [5, 4, 6], [0, 3], [2, 1, 5, 4], [6, 0, 3], [4, 5]]
    epochs = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    targets = torch.tensor([0, 1, 2, 3, 1, 2, 0, 1])
    with Recorder(path, nn.Linear(1, 4), num_classes=4, num_examples=8, chunk_steps=2,
                  param_stats=False) as rec:
        for s, ids in enumerate(batches):
            ids = torch.tensor(ids)
            logits = torch.randn(len(ids), 4, generator=g) * 2
            losses = F.cross_entropy(logits, targets[ids], reduction="none")
            if s == 6:
                losses[1] = float("nan")
            with rec.step(example_ids=ids, targets=targets[ids], epoch=epochs[s]) as step:
                step.record(losses=losses, logits=None if s in (4, 9) else logits)
    return path


@pytest.fixture(params=["one_chunk_per_block", "default_blocks"])
def block_size(request, monkeypatch):
    if request.param == "one_chunk_per_block":
        monkeypatch.setattr(blockwise, "BLOCK_CELLS", 1)
        monkeypatch.setattr(difficulty_module, "ROW_CELLS", 1)   # one epoch row per group
    return request.param


@pytest.mark.parametrize("which", ["edge", "tiny", "planted_noisy"])
def test_difficulty_and_trajectories_equal_numpy(which, block_size, request):
    path = request.getfixturevalue({"edge": "edge_run", "tiny": "tiny_run", "planted_noisy": "planted_noisy_run"}[which])
    run = analysis.open_run(path)
    epochs, examples, target, ref = reference_epoch_tables(path)
    d = analysis.difficulty(run)
    np.testing.assert_array_equal(d.epoch, epochs)
    np.testing.assert_array_equal(d.example, examples)
    np.testing.assert_array_equal(d.target, target)
    np.testing.assert_array_equal(d.loss, ref["loss"].astype(np.float32))
    np.testing.assert_array_equal(d.difficulty, (1 - ref["p_gold"]).astype(np.float32))
    np.testing.assert_array_equal(d.accuracy, ref["correct"].astype(np.float32))
    classes = np.arange(run.num_classes)
    for var in ("loss", "difficulty", "accuracy"):
        per_class, mean = previous_class_means(d[var].values, target, classes)
        np.testing.assert_array_equal(d[f"class_{var}"], per_class)
        np.testing.assert_array_equal(d[f"mean_{var}"], mean)
    lt = analysis.loss_trajectories(run, source="train")
    np.testing.assert_array_equal(lt.loss, ref["loss"].astype(np.float32))
    np.testing.assert_array_equal(lt.example_id, examples)
    np.testing.assert_array_equal(lt.target, target)
    np.testing.assert_array_equal(lt.epoch, epochs)


@pytest.mark.parametrize("which", ["edge", "tiny", "planted_noisy"])
def test_class_curves_equal_numpy(which, block_size, request):
    path = request.getfixturevalue({"edge": "edge_run", "tiny": "tiny_run", "planted_noisy": "planted_noisy_run"}[which])
    run = analysis.open_run(path)
    classes = np.arange(run.num_classes)
    epochs, loss, acc = reference_class_curves(path, classes)
    c = analysis.class_curves(run)
    np.testing.assert_array_equal(c.epoch, epochs)
    assert c.train_loss.dims == ("epoch", "class_id")
    np.testing.assert_allclose(c.train_loss, loss, rtol=1e-13)
    np.testing.assert_allclose(c.train_accuracy, acc, rtol=1e-13)
    old_loss, old_acc = previous_class_curves(run, classes)
    np.testing.assert_allclose(c.train_loss, old_loss, rtol=1e-6)
    np.testing.assert_array_equal(c.train_accuracy, old_acc)
    if which == "edge":   # the cases the fixture plants are really there
        assert np.isnan(c.train_loss.sel(epoch=2)).sum() >= 1            # the NaN loss
        acc1 = c.train_accuracy.sel(epoch=1).values                        # step 4 (classes 0, 1) had no logits
        assert np.isnan(acc1[[0, 1]]).all() and np.isfinite(acc1[2])
        assert np.isnan(c.train_loss.sel(epoch=1, class_id=3))           # no class 3 in epoch 1
        assert np.isfinite(c.train_loss.sel(epoch=0)).all()


@pytest.mark.parametrize("which", ["edge", "tiny", "planted_noisy"])
def test_epoch_curves_in_step_blocks_equal_the_whole_table(which, block_size, request):
    path = request.getfixturevalue({"edge": "edge_run", "tiny": "tiny_run", "planted_noisy": "planted_noisy_run"}[which])
    run = analysis.open_run(path)
    new = analysis.epoch_curves(run)
    old = previous_epoch_curves(run)
    for var in old.data_vars:
        xr.testing.assert_identical(new[var].drop_attrs(), old[var].drop_attrs())
