"""Every group of a recorded run opens with plain xarray, and open_run rejects non-runs
with messages that say what to do."""
from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from dynascope import analysis
from dynascope.analysis import RunError


def test_every_group_opens_with_plain_xarray(tiny_run):
    run = analysis.open_run(tiny_run)
    assert run.status == "complete"
    for group in ("train", "probe", "eval", "ground_truth", "examples", "params"):
        ds = xr.open_zarr(tiny_run, group=group)
        assert ds.data_vars, group
    train = xr.open_zarr(tiny_run, group="train")
    assert set(train.example_id.dims) == {"step", "slot"}
    assert train.logits.dims == ("step", "slot", "class")
    # 256 examples, batch 50, 3 epochs -> 6 steps per epoch (last batch 6 examples)
    assert train.sizes["step"] == 18
    np.testing.assert_array_equal(train.batch_size.values, [50] * 5 + [6] + [50] * 5 + [6] + [50] * 5 + [6])
    ids = train.example_id.values
    for e in range(3):
        seen = ids[6 * e: 6 * e + 6]
        assert sorted(seen[seen >= 0].tolist()) == list(range(256))   # each example once per epoch
    probe = xr.open_zarr(tiny_run, group="probe")
    assert probe.sizes["probe"] == 4 and probe.sizes["example"] == 64   # initial + one per epoch
    np.testing.assert_array_equal(probe.epoch.values, [-1, 0, 1, 2])
    np.testing.assert_array_equal(probe.step.values, [0, 6, 12, 18])


def test_ground_truth_is_stored_for_planted_runs(tiny_run):
    gt = analysis.open_run(tiny_run).ground_truth
    assert gt.sizes["example"] == 256
    flipped = gt.is_mislabeled.values
    examples = xr.open_zarr(tiny_run, group="examples")
    # the stored training targets are the (possibly flipped) labels the model saw
    assert (examples.target.values[flipped] != gt.clean_target.values[flipped]).all()
    assert (examples.target.values[~flipped] == gt.clean_target.values[~flipped]).all()


def test_open_run_explains_bad_paths(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        analysis.open_run(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="not a Zarr v3 store"):
        analysis.open_run(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(RunError, match="not a dynascope run"):
        analysis.open_run(tmp_path / "other.zarr")
    g = zarr.open_group(str(tmp_path / "future.zarr"), mode="w")
    g.attrs["dynascope"] = {"schema_version": 99}
    with pytest.raises(RunError, match="schema 99"):
        analysis.open_run(tmp_path / "future.zarr")


def test_saved_results_round_trip_with_params(tiny_run, tmp_path):
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(tiny_run, path)
    result = analysis.epoch_curves(analysis.open_run(path))
    analysis.save_result(path, "epoch_curves", result, {"note": "x"})
    back = analysis.load_result(path, "epoch_curves")
    np.testing.assert_allclose(back.train_loss.values, result.train_loss.values)
    assert back.attrs["params"] == {"note": "x"}
    assert analysis.saved_results(path) == ["epoch_curves"]
    meta = json.loads((path / "zarr.json").read_text())
    assert meta["attributes"]["status"] == "complete"
