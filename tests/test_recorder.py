"""The Recorder stores exactly what it was given, per step, with padding for short batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr

from dynascope import analysis
from dynascope.recorder import Recorder


def _train(path, steps_batches, *, num_classes=3, num_examples=40, chunk_steps=2, fail_at=None, **kw):
    """Record one SGD step per batch of ids; returns the losses/logits given to record()."""
    torch.manual_seed(0)
    X = torch.randn(num_examples, 4)
    Y = torch.arange(num_examples) % num_classes
    model = nn.Linear(4, num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    given = []
    with Recorder(path, model, num_classes=num_classes, num_examples=num_examples, optimizer=opt,
                  chunk_steps=chunk_steps, **kw) as rec:
        for i, ids in enumerate(steps_batches):
            if fail_at == i:
                raise RuntimeError("boom")
            ids = torch.as_tensor(ids)
            with rec.step(example_ids=ids, targets=Y[ids]) as step:
                logits = model(X[ids])
                losses = F.cross_entropy(logits, Y[ids], reduction="none")
                step.record(losses=losses, logits=logits)
                losses.mean().backward()
            given.append((ids.numpy(), Y[ids].numpy(), losses.detach().numpy(), logits.detach().numpy()))
            opt.step()
            opt.zero_grad()
    return given


def test_rows_hold_exactly_what_was_recorded_with_padding(tmp_path):
    batches = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]] * 2   # 12 examples per "epoch"
    given = _train(tmp_path / "r.zarr", batches, num_examples=12)
    train = xr.open_zarr(tmp_path / "r.zarr", group="train")
    assert train.sizes["step"] == 6 and train.sizes["slot"] == 5
    for s, (ids, y, loss, logits) in enumerate(given):
        n = len(ids)
        np.testing.assert_array_equal(train.example_id[s, :n], ids)
        np.testing.assert_array_equal(train.example_id[s, n:], -1)
        np.testing.assert_array_equal(train.target[s, :n], y)
        np.testing.assert_array_equal(train.loss[s, :n], loss)
        assert np.isnan(train.loss[s, n:]).all()
        np.testing.assert_array_equal(train.logits[s, :n], logits)
        assert float(train.batch_loss[s]) == pytest.approx(float(loss.mean()), rel=1e-6)
        assert int(train.batch_size[s]) == n
    # epochs inferred from examples seen: 12 per epoch
    np.testing.assert_array_equal(train.epoch, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(train.optimizer_step, np.arange(6))
    np.testing.assert_allclose(train.lr, 0.1)
    assert np.all(np.diff(train.wall_time.values) >= 0)


def test_slot_width_grows_when_a_larger_batch_arrives(tmp_path):
    batches = [[0, 1], [2, 3], [4, 5, 6, 7, 8], [9]]
    given = _train(tmp_path / "r.zarr", batches, chunk_steps=2)
    train = analysis.open_run(tmp_path / "r.zarr").train
    assert train.sizes["slot"] == 5
    for s, (ids, *_rest) in enumerate(given):
        row = train.example_id[s].values
        np.testing.assert_array_equal(row[: len(ids)], ids)
        assert (row[len(ids):] == -1).all()


def test_exception_marks_failed_and_keeps_recorded_rows(tmp_path):
    batches = [[i, i + 1] for i in range(0, 20, 2)]
    with pytest.raises(RuntimeError, match="boom"):
        _train(tmp_path / "r.zarr", batches, fail_at=7, chunk_steps=4)
    run = analysis.open_run(tmp_path / "r.zarr")
    assert run.status == "failed"
    assert "boom" in run.attrs["error"]
    assert run.committed["train"] == 7   # buffered rows are flushed on failure
    np.testing.assert_array_equal(run.train.example_id.values[:, 0], np.arange(0, 14, 2))
    assert "failed" in run.describe_progress()


def test_existing_store_is_never_overwritten_unless_asked(tmp_path):
    path = tmp_path / "r.zarr"
    _train(path, [[0, 1]])
    before = analysis.open_run(path).train.loss.values.copy()
    with pytest.raises(FileExistsError, match="overwrite"):
        _train(path, [[2, 3], [4, 5]])
    run = analysis.open_run(path)
    assert run.status == "complete" and run.committed["train"] == 1
    np.testing.assert_array_equal(run.train.loss.values, before)
    _train(path, [[2, 3], [4, 5]], overwrite=True)
    assert analysis.open_run(path).committed["train"] == 2


def test_overwrite_refuses_to_delete_a_non_store_directory(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not a Zarr store"):
        _train(tmp_path / "precious", [[0]], overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([0.0, 1.0]), "must be integers"),
    (torch.tensor([0, 40]), "out of range"),
    (torch.tensor([-1, 0]), ">= 0"),
    (torch.tensor([[0, 1]]), "1-D"),
])
def test_bad_example_ids_get_clear_errors_and_keep_earlier_rows(tmp_path, ids, match):
    path = tmp_path / "r.zarr"
    model = nn.Linear(4, 3)
    with pytest.raises((TypeError, ValueError), match=match):
        with Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=8) as rec:
            with rec.step(example_ids=torch.tensor([5, 6]), targets=torch.tensor([0, 1])) as step:
                out = model(torch.randn(2, 4))
                step.record(losses=out.sum(1), logits=out)
            rec.step(example_ids=ids, targets=torch.zeros(ids.shape[-1], dtype=torch.long))
    run = analysis.open_run(path)
    assert run.status == "failed" and run.committed["train"] == 1
    np.testing.assert_array_equal(run.train.example_id.values[0], [5, 6])


def test_logits_batch_mismatch_is_reported(tmp_path):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"logits must have shape \(2, num_classes\)"):
        with Recorder(tmp_path / "r.zarr", model, num_classes=3, num_examples=10) as rec:
            with rec.step(example_ids=torch.tensor([0, 1]), targets=torch.tensor([0, 1])) as step:
                out = model(torch.randn(3, 4))
                step.record(losses=out.sum(1)[:2], logits=out)


def test_losses_must_be_per_example(tmp_path):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="reduction='none'"):
        with Recorder(tmp_path / "r.zarr", model, num_classes=3, num_examples=10) as rec:
            with rec.step(example_ids=torch.tensor([0, 1]), targets=torch.tensor([0, 1])) as step:
                out = model(torch.randn(2, 4))
                step.record(losses=out.sum(), logits=out)


def test_regression_run_records_float_targets_without_logits(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    X, Y = torch.randn(8, 3), torch.randn(8)
    with Recorder(tmp_path / "r.zarr", model, num_examples=8) as rec:
        with rec.step(example_ids=torch.arange(8), targets=Y) as step:
            losses = (model(X).squeeze(1) - Y) ** 2
            step.record(losses=losses)
            losses.mean().backward()
    train = xr.open_zarr(tmp_path / "r.zarr", group="train")
    assert train.target.dtype == np.float32 and "logits" not in train
    np.testing.assert_allclose(train.target[0], Y.numpy())
    assert analysis.open_run(tmp_path / "r.zarr").dataset["task"] == "regression"


def test_probe_rows_are_ordered_by_example_id_and_subset_is_fixed(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    X, Y = torch.randn(20, 4), torch.arange(20) % 3
    ids = torch.tensor([7, 3, 11, 5])
    with pytest.raises(ValueError, match="fixed subset"):
        with Recorder(tmp_path / "r.zarr", model, num_classes=3, num_examples=20) as rec:
            rec.probe([(X[ids], Y[ids], ids)])
            rec.probe([(X[ids[:2]], Y[ids[:2]], ids[:2])])
    probe = analysis.open_run(tmp_path / "r.zarr").probe
    order = torch.argsort(ids)
    np.testing.assert_array_equal(probe.example_id, ids[order])
    expected = F.cross_entropy(model(X[ids]), Y[ids], reduction="none")[order]
    np.testing.assert_allclose(probe.loss[0], expected.detach().numpy(), rtol=1e-6)
    assert probe.sizes["probe"] == 1


def test_probe_flush_does_not_cut_the_train_chunk_short(tmp_path):
    """A probe row is written at once; the partial train chunk stays buffered so each train
    chunk is still written whole (no read-modify-write)."""
    import json

    model = nn.Linear(4, 3)
    X, Y = torch.randn(20, 4), torch.arange(20) % 3
    path = tmp_path / "r.zarr"
    with Recorder(path, model, num_classes=3, num_examples=20, chunk_steps=4) as rec:
        for s in range(3):
            ids = torch.tensor([s])
            with rec.step(example_ids=ids, targets=Y[ids]) as step:
                out = model(X[ids])
                step.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)
        rec.probe([(X[:5], Y[:5], torch.arange(5))])
        committed = json.loads((path / "zarr.json").read_text())["attributes"]["committed"]
        assert committed["probe"] == 1 and committed["train"] == 0
    assert analysis.open_run(path).committed["train"] == 3
