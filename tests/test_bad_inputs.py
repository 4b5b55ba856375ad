"""The bad inputs a user tried, and what each now gets: one clear error (exception class and
wording) before training where possible, or a warning with an explicit count, and never the
loss of what was already recorded."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from dynascope import analysis
from dynascope.analysis.run import RunError
from dynascope.recorder import Recorder
from dynascope.recorder.lock import StoreLockedError
from dynascope.recorder.resume import ResumeError

X, Y = torch.randn(40, 4), torch.arange(40) % 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _good_step(rec, model, ids):
    ids = torch.as_tensor(ids)
    with rec.step(example_ids=ids, targets=Y[ids]) as st:
        out = model(X[ids])
        st.record(losses=F.cross_entropy(out, Y[ids], reduction="none"), logits=out)


def _out(model, n=2):
    out = model(X[:n])
    return out, F.cross_entropy(out, Y[:n], reduction="none")


def _step(ids=(0, 1), targets="auto", losses="auto", logits="auto", record=True, twice=False):
    """A bad training step, described by what differs from a good one."""
    def run(rec, model):
        t = Y[:2] if isinstance(targets, str) else targets
        with rec.step(example_ids=ids, targets=t) as st:
            out, loss = _out(model)
            if record:
                st.record(losses=loss if isinstance(losses, str) else losses,
                          logits=out if isinstance(logits, str) else logits)
            if twice:
                st.record(losses=loss, logits=out)
    return run


def _probe(batches):
    return lambda rec, model: rec.probe(batches)


def _two_probes(first, second):
    def run(rec, model):
        rec.probe(first)
        rec.probe(second)
    return run


I = torch.arange(4)
# id, bad call inside an open Recorder that already holds 2 steps, exception, wording
STEP_CASES = [
    ("ids-float", _step(ids=torch.tensor([0.0, 1.0])), TypeError, "example_ids must be integers"),
    ("ids-bool", _step(ids=torch.tensor([True, False])), TypeError, "example_ids must be integers"),
    ("ids-out-of-range", _step(ids=torch.tensor([0, 40])), ValueError, "out of range for num_examples=40"),
    ("ids-negative", _step(ids=torch.tensor([-1, 0])), ValueError, "example_ids must be >= 0"),
    ("ids-2d", _step(ids=torch.tensor([[0, 1]])), ValueError, "must be 1-D"),
    ("ids-empty", _step(ids=torch.tensor([], dtype=torch.long)), ValueError, "example_ids is empty"),
    ("ids-duplicate", _step(ids=torch.tensor([3, 3])), ValueError, "repeat within one batch"),
    ("ids-strings", _step(ids=["a", "b"]), TypeError, "example_ids must be"),
    ("ids-object", _step(ids=object()), TypeError, "example_ids must be"),
    ("targets-missing", _step(targets=None), ValueError, "needs targets= in a classification run"),
    ("targets-length", _step(targets=torch.tensor([0, 1, 2])), ValueError, "targets has 3 rows but example_ids has 2"),
    ("targets-float", _step(targets=torch.tensor([0.0, 1.0])), TypeError, "integer class indices"),
    ("targets-range", _step(targets=torch.tensor([0, 7])), ValueError, "targets must be in [0, 3)"),
    ("targets-negative", _step(targets=torch.tensor([-1, 0])), ValueError, "targets must be in [0, 3)"),
    ("losses-scalar", _step(losses=torch.tensor(1.0)), ValueError, "reduction='none'"),
    ("losses-length", _step(losses=torch.ones(3)), ValueError, "losses must have shape (2,)"),
    ("losses-numpy", _step(losses=np.ones(2)), TypeError, "losses must be a torch.Tensor"),
    ("losses-list", _step(losses=[1.0, 2.0]), TypeError, "losses must be a torch.Tensor"),
    ("logits-batch", _step(logits=torch.zeros(3, 3)), ValueError, "logits"),
    ("logits-classes", _step(logits=torch.zeros(2, 5)), ValueError, "num_classes=3"),
    ("logits-list", _step(logits=[[0.0] * 3] * 2), TypeError, "logits must be a torch.Tensor"),
    ("record-twice", _step(twice=True), RuntimeError, "called twice"),
    ("record-missing", _step(record=False), RuntimeError, "without step.record"),
    ("probe-pairs", _probe([(X[:4], Y[:4])]), ValueError, "must yield (inputs, targets, example_ids)"),
    ("probe-empty", _probe([]), ValueError, "yielded no batches"),
    ("probe-repeats", _probe([(X[:4], Y[:4], I), (X[:4], Y[:4], I)]), ValueError, "yielded some example ids twice"),
    ("probe-duplicate-batch", _probe([(X[:2], Y[:2], torch.tensor([1, 1]))]), ValueError, "repeat within one batch"),
    ("probe-subset-changes", _two_probes([(X[:4], Y[:4], I)], [(X[:2], Y[:2], I[:2])]), ValueError, "fixed subset"),
    ("probe-ids-range", _probe([(X[:2], Y[:2], torch.tensor([0, 99]))]), ValueError, "out of range"),
    ("eval-pairs", lambda rec, m: rec.evaluate([(X[:4], Y[:4])]), ValueError, "must yield (inputs, targets, example_ids)"),
]


@pytest.mark.parametrize("bad, exc, words", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_bad_step_inputs_fail_clearly_and_keep_recorded_rows(tmp_path, bad, exc, words):
    path = tmp_path / "r.zarr"
    torch.manual_seed(0)
    model = Net()
    with pytest.raises(exc) as info:
        with Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=8) as rec:
            _good_step(rec, model, [5, 6])
            _good_step(rec, model, [7, 8])
            bad(rec, model)
    assert words in str(info.value)
    run = analysis.open_run(path)
    assert run.status == "failed" and words.split("(")[0][:20] in run.attrs["error"]
    assert run.committed["train"] == 2
    np.testing.assert_array_equal(run.train.example_id.values, [[5, 6], [7, 8]])


def _new(**kw):
    return lambda path, model: Recorder(path, model, **{"num_classes": 3, "num_examples": 40, **kw}).open()


def _existing(status="complete", **kw):
    """A recorded run at `path` (complete, or killed while recording), then a bad reopen."""
    def run(path, model):
        rec = Recorder(path, model, num_classes=3, num_examples=40, config={"lr": 0.1})
        rec.open()
        _good_step(rec, model, [5, 6])
        if status == "complete":
            rec.close()
        else:
            rec.flush()
            rec._lock.release()
            rec._writer.abort()
            rec._writer = None
        Recorder(path, model, **{"num_classes": 3, "num_examples": 40, "config": {"lr": 0.1}, **kw}).open()
    return run


def _non_store_dir(path, model):
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    Recorder(path, model, num_classes=3, overwrite=True).open()


OPEN_CASES = [
    ("num-classes-zero", _new(num_classes=0), ValueError, "num_classes must be a positive integer"),
    ("num-classes-fraction", _new(num_classes=2.5), ValueError, "num_classes must be a positive integer"),
    ("num-examples-zero", _new(num_examples=0), ValueError, "num_examples must be a positive integer"),
    ("num-examples-negative", _new(num_examples=-5), ValueError, "num_examples must be a positive integer"),
    ("chunk-steps-zero", _new(chunk_steps=0), ValueError, "chunk_steps must be a positive integer"),
    ("unknown-keyword", _new(grad_norm=True), TypeError, "unknown keyword"),
    ("resume-and-overwrite", _new(resume=True, overwrite=True), ValueError, "pass one of them"),
    ("grad-layers-typo", _new(grad_norms=True, grad_layers=["fc3"]), ValueError, "grad_layers: 'fc3' matches no module of the model; close names: ['fc2', 'fc1']"),
    ("grad-layers-pattern", _new(grad_norms=True, grad_layers=["layer*"]), ValueError, "'layer*' matches no module"),
    ("activations-typo", _new(activations=["fc9"]), ValueError, "activations: no module matches ['fc9']"),
    ("snapshot-unknown", _new(snapshot_params=["fc.weight"]), ValueError, "are not recorded parameters"),
    ("snapshot-every-negative", _new(snapshot_params=["fc1.bias"], snapshot_every=-1), ValueError, "snapshot_every must be >= 0"),
    ("exists-no-overwrite", _existing(), FileExistsError, "already exists"),
    ("overwrite-non-store", _non_store_dir, FileExistsError, "not a Zarr store"),
    ("resume-missing", _new(resume=True), ResumeError, "holds no run to resume"),
    ("resume-complete", _existing(resume=True), ResumeError, "status 'complete'"),
    ("resume-other-config", _existing("recording", resume=True, config={"lr": 0.2}), ResumeError, "config lr: recorded 0.1, now 0.2"),
    ("resume-other-classes", _existing("recording", resume=True, num_classes=4), ResumeError, "dataset num_classes: recorded 3, now 4"),
]


@pytest.mark.parametrize("bad, exc, words", [c[1:] for c in OPEN_CASES], ids=[c[0] for c in OPEN_CASES])
def test_bad_recorder_arguments_fail_before_training(tmp_path, bad, exc, words):
    path = tmp_path / "r.zarr"
    model = Net()
    with pytest.raises(exc) as info:
        bad(path, model)
    assert words in str(info.value)
    if path.exists() and (path / "zarr.json").exists():        # an earlier run keeps its rows
        run = analysis.open_run(path)
        np.testing.assert_array_equal(run.train.example_id.values, [[5, 6]])
    elif path.exists():
        assert (path / "notes.txt").read_text() == "keep me"
    lock = path / ".dynascope" / "lock"
    assert not lock.exists()                                     # nothing left locked


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "run.zarr"
    model = Net()
    with Recorder(path, model, num_classes=3, num_examples=40) as rec:
        _good_step(rec, model, [0, 1, 2])
    return path


def _plain_zarr(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    return analysis.open_run(tmp_path / "plain.zarr")


ANALYSIS_CASES = [
    ("cos-threshold-5", lambda run, tmp: analysis.ANALYSES["opposing_pairs"].func(run, cos_threshold=5), "cos_threshold=5 is outside [-1, 1]"),
    ("cos-threshold-text", lambda run, tmp: analysis.ANALYSES["opposing_pairs"].func(run, cos_threshold="low"), "cos_threshold must be a number"),
    ("cos-threshold-nan", lambda run, tmp: analysis.ANALYSES["opposing_pairs"].func(run, cos_threshold=float("nan")), "is outside [-1, 1]"),
    ("magnitude-ratio", lambda run, tmp: analysis.ANALYSES["opposing_pairs"].func(run, magnitude_ratio=0.5), "magnitude_ratio=0.5 is outside"),
    ("top-k-zero", lambda run, tmp: analysis.ANALYSES["opposing_pairs"].func(run, top_k=0), "top_k=0 is outside"),
    ("majority-threshold", lambda run, tmp: analysis.ANALYSES["majority_opposition"].func(run, threshold=2), "threshold=2 is outside [-1, 1]"),
    ("auroc-lengths", lambda run, tmp: analysis.auroc([1, 2, 3], [1, 0]), "differ in length"),
    ("open-missing", lambda run, tmp: analysis.open_run(tmp / "nope.zarr"), "does not exist"),
    ("open-not-zarr", lambda run, tmp: (tmp / "d").mkdir() or analysis.open_run(tmp / "d"), "not a Zarr v3 store"),
    ("open-plain-zarr", lambda run, tmp: _plain_zarr(tmp), "not a dynascope run"),
]


@pytest.mark.parametrize("bad, words", [c[1:] for c in ANALYSIS_CASES], ids=[c[0] for c in ANALYSIS_CASES])
def test_bad_analysis_parameters_fail_clearly(small_run, tmp_path, bad, words):
    with pytest.raises((ValueError, RunError)) as info:
        bad(analysis.open_run(small_run), tmp_path)
    assert words in str(info.value)


CLI_CASES = [
    ("augment-out-of-range", ["--augment-samples", "99999"], "ids [99999] are out of range: the training set has 64"),
    ("augment-not-numbers", ["--augment-samples", "a,b"], "must be comma-separated example ids"),
    ("augment-repeated", ["--augment-samples", "3,3"], "lists an id twice"),
    ("grad-layers-typo", ["--grad-norms", "--grad-layers", "fc3"], "'fc3' matches no module of the model; close names"),
    ("resume-missing", ["--resume"], "holds no run to resume"),
    ("epochs-zero", ["--epochs", "0"], "0 is not in the range x>=1"),
    ("checkpoint-negative", ["--checkpoint-every", "-1"], "-1 is not in the range x>=0"),
    ("unknown-dataset", ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
]


@pytest.mark.parametrize("args, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_record_options_fail_before_training(tmp_path, args, words):
    from dynascope.cli import main

    out = tmp_path / "run.zarr"
    base = ["record", "--out", str(out), "--epochs", "1", "--train-size", "64", "--test-size", "32",
            "--probe-size", "16", "--device", "cpu"]
    res = CliRunner().invoke(main, base + args)
    assert res.exit_code in (1, 2), res.output
    assert words in res.output and "Traceback" not in res.output
    assert not out.exists()              # nothing was trained or left behind


def test_resume_with_a_differing_option_names_it(tmp_path):
    from dynascope.cli import main

    out = tmp_path / "run.zarr"
    model = Net()
    rec = Recorder(out, model, num_classes=3, num_examples=40, config={"lr": 0.05, "epochs": 1})
    rec.open()
    _good_step(rec, model, [5, 6])
    rec.flush()
    rec._lock.release()
    res = CliRunner().invoke(main, ["record", "--out", str(out), "--resume", "--lr", "0.1"])
    assert res.exit_code == 1 and "--lr 0.1 (recorded: 0.05)" in res.output
    assert analysis.open_run(out).committed["train"] == 1
    rec._writer.abort()


def test_a_live_run_is_never_overwritten(tmp_path):
    path = tmp_path / "r.zarr"
    model = Net()
    with Recorder(path, model, num_classes=3, num_examples=40) as rec:
        _good_step(rec, model, [1, 2])
        with pytest.raises(StoreLockedError, match="already open for recording in this process"):
            Recorder(path, model, num_classes=3, overwrite=True).open()
        _good_step(rec, model, [3, 4])
    assert analysis.open_run(path).committed["train"] == 2


# -- inputs that are kept, counted and reported -------------------------------------------------
def test_nan_losses_and_logits_are_counted_and_never_averaged_as_zero(tmp_path):
    from dynascope.analysis import epoch_curves
    from dynascope.analyze import summary_lines
    from dynascope.describe import describe_run, format_description

    path = tmp_path / "nan.zarr"
    model = Net()
    with pytest.warns(UserWarning, match="NaN/inf loss"):
        with Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=2) as rec:
            for s in range(6):
                ids = torch.arange(s * 4, s * 4 + 4)
                with rec.step(example_ids=ids, targets=Y[ids], epoch=s // 3) as st:
                    out = model(X[ids])
                    loss = F.cross_entropy(out, Y[ids], reduction="none")
                    if s == 4:
                        loss = loss * torch.tensor([1.0, float("nan"), float("inf"), 1.0])
                        out = out * torch.tensor([[1.0], [float("nan")], [1.0], [1.0]])
                    st.record(losses=loss, logits=out)
    run = analysis.open_run(path)
    assert run.train.nonfinite_loss.values.tolist() == [0, 0, 0, 0, 2, 0]
    assert run.train.nonfinite_logits.values.tolist() == [0, 0, 0, 0, 1, 0]
    c = epoch_curves(run)
    assert np.isfinite(float(c.train_loss.sel(epoch=0))) and np.isnan(float(c.train_loss.sel(epoch=1)))
    assert np.isnan(float(c.train_accuracy.sel(epoch=1)))
    assert c.train_nonfinite_loss.values.tolist() == [0, 2]
    text = "\n".join(summary_lines(run))
    assert "2 training losses read as NaN/inf in epoch(s) [1]" in text and "loss n/a" in text
    info = format_description(describe_run(path))
    assert "2 train example(s) with NaN/inf loss" in info and "1 train example(s) with NaN/inf logits" in info


def test_a_deleted_chunk_is_reported_not_read_as_zero(tmp_path):
    from dynascope.analysis import epoch_curves
    from dynascope.describe import describe_run, format_description

    path = tmp_path / "hole.zarr"
    model = Net()
    with Recorder(path, model, num_classes=3, num_examples=40, chunk_steps=2) as rec:
        for s in range(6):
            _good_step(rec, model, list(range(s * 4, s * 4 + 4)))
    for name in ("loss", "batch_size"):
        chunk = next((path / "train" / name / "c").rglob("*"))
        while chunk.is_dir():
            chunk = next(chunk.iterdir())
        chunk.unlink()
    run = analysis.open_run(path)
    c = epoch_curves(run)
    assert np.isnan(float(c.train_loss.isel(epoch=0)))     # not 0, not the mean of what is left
    assert "2 committed train rows read back empty" in format_description(describe_run(path))


def test_layer_cka_is_nan_for_nan_activations_like_cka():
    from dynascope.analysis.cka import cka, cka_matrix

    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(30, 5)), rng.normal(size=(30, 4))
    B[3, 1] = np.nan
    assert np.isnan(cka(A, B))
    with pytest.warns(UserWarning, match="NaN/inf activations"):
        M = cka_matrix([A, B, A])
    assert np.isnan(M[1]).all() and np.isnan(M[:, 1]).all()
    assert M[0, 2] == pytest.approx(1.0) and M[0, 0] == pytest.approx(1.0)


def test_mislabel_auroc_reports_how_many_examples_it_scored(planted_noisy_run):
    r = analysis.ANALYSES["mislabel_detection"].func(analysis.open_run(planted_noisy_run))
    n = r.attrs["num_examples"]
    assert ((r.n_scored + r.n_dropped) == n).all()
    assert int(r.n_scored.sel(score="aum")) == n - int(r.n_dropped.sel(score="aum"))


# -- epochs ------------------------------------------------------------------------------
def _epochs(tmp_path, loader_batches, num_examples, **step_kw):
    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(tmp_path / "e.zarr", model, num_classes=3, num_examples=num_examples) as rec:
            for ids in loader_batches:
                _good_step(rec, model, ids)
    return analysis.open_run(tmp_path / "e.zarr").train.epoch.values.tolist(), [str(w.message) for w in caught]


def test_epochs_are_inferred_exactly_with_drop_last(tmp_path):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(range(40), batch_size=7, shuffle=True, drop_last=True, generator=g)
    batches, truth = [], []
    for e in range(5):
        for b in loader:
            batches.append(b)
            truth.append(e)
    got, warned = _epochs(tmp_path, batches, 40)
    assert got == truth and not [w for w in warned if "epoch" in w]


def test_epochs_without_num_examples_are_inferred_not_all_zero(tmp_path):
    batches = [list(range(i, i + 5)) for i in range(0, 20, 5)] * 3
    got, _ = _epochs(tmp_path, batches, None)
    assert got == [0] * 4 + [1] * 4 + [2] * 4


def test_epochs_over_a_subset_warn_once(tmp_path):
    batches = [[0, 1, 2], [3, 4, 5]] * 3          # a sampler over 6 of 40 examples
    got, warned = _epochs(tmp_path, batches, 40)
    assert got == [0, 0, 1, 1, 2, 2]
    assert sum("inferred to end after 6 of 40 examples" in w for w in warned) == 1


def test_epochs_given_by_the_loop_win(tmp_path):
    model = Net()
    with Recorder(tmp_path / "e.zarr", model, num_classes=3, num_examples=40) as rec:
        rec.epoch = 7
        _good_step(rec, model, [0, 1])
        _good_step(rec, model, [0, 1])          # a repeat would start a new inferred epoch
        rec.epoch = None
    run = analysis.open_run(tmp_path / "e.zarr")
    assert run.train.epoch.values.tolist() == [7, 7] and run.attrs["epoch_source"] == "loop"


def test_the_table_has_at_least_fifty_cases():
    assert len(STEP_CASES) + len(OPEN_CASES) + len(ANALYSIS_CASES) + len(CLI_CASES) + 9 >= 50
