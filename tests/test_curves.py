"""Training curves equal a direct numpy computation from the raw recorded arrays."""
from __future__ import annotations

import numpy as np
import xarray as xr

from dynascope import analysis
def _raw(path):
    t = xr.open_zarr(path, group="train").load()
    return t.example_id.values, t.target.values, t.loss.values, t.logits.values, t.epoch.values


def test_epoch_curves_match_numpy(tiny_run):
    ids, target, loss, logits, epoch = _raw(tiny_run)
    c = analysis.epoch_curves(analysis.open_run(tiny_run))
    for e in np.unique(epoch):
        rows = epoch == e
        valid = ids[rows] >= 0
        assert np.isclose(c.train_loss.sel(epoch=e), loss[rows][valid].mean(), rtol=1e-6)
        acc = (logits[rows][valid].argmax(-1) == target[rows][valid]).mean()
        assert np.isclose(c.train_accuracy.sel(epoch=e), acc)
    ev = xr.open_zarr(tiny_run, group="eval").load()
    for i, e in enumerate(ev.epoch.values):
        if e < 0:
            continue
        assert np.isclose(c.eval_loss.sel(epoch=e), ev.loss.values[i].mean(), rtol=1e-6)
        acc = (ev.logits.values[i].argmax(-1) == ev.target.values).mean()
        assert np.isclose(c.eval_accuracy.sel(epoch=e), acc)


def test_class_curves_match_numpy(tiny_run):
    ids, target, loss, logits, epoch = _raw(tiny_run)
    c = analysis.class_curves(analysis.open_run(tiny_run))
    for e in np.unique(epoch):
        rows = epoch == e
        valid = ids[rows] >= 0
        t, l, lg = target[rows][valid], loss[rows][valid], logits[rows][valid]
        for k in np.unique(t):
            m = t == k
            assert np.isclose(c.train_loss.sel(epoch=e, class_id=k), l[m].mean(), rtol=1e-6)
            assert np.isclose(c.train_accuracy.sel(epoch=e, class_id=k), (lg[m].argmax(-1) == k).mean())


def test_train_loss_trajectories_are_per_epoch_means(tiny_run):
    ids, target, loss, logits, epoch = _raw(tiny_run)
    t = analysis.loss_trajectories(analysis.open_run(tiny_run), source="train")
    for j in [0, 17, 255]:
        ex = int(t.example_id[j])
        for e in range(3):
            m = (ids == ex) & (epoch[:, None] == e)
            assert np.isclose(t.loss.sel(epoch=e)[j], loss[m].mean(), rtol=1e-6)
            assert int(t.target[j]) == target[m][0]


def test_loss_change_is_the_difference_of_consecutive_values(tiny_run):
    run = analysis.open_run(tiny_run)
    ch = analysis.loss_change(run)
    bl = run.train.batch_loss.values
    np.testing.assert_allclose(ch.batch_loss_change.values[1:], np.diff(bl), rtol=1e-6)
    assert np.isnan(ch.batch_loss_change.values[0])
    pl = run.probe.loss.values
    np.testing.assert_allclose(ch.probe_loss_change.values, np.diff(pl, axis=0), rtol=1e-6)
