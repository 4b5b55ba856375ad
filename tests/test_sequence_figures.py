"""`dynascope figures` on a language-model run: the figures defined for sequences are
written, and those that need one target per example or class labels are skipped with the
reason (not a KeyError and exit 1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dynascope import analysis
from dynascope.cli import main
from dynascope.figures.registry import FIGURES
from dynascope.figures.render import render_all
from dynascope.recorder import Recorder
from seq_helpers import TinyLM

IGNORE = -100
torch.set_num_threads(1)


def _loss(z, y):
    return F.cross_entropy(z.transpose(1, 2), y, reduction="none").sum(1) / (y != IGNORE).sum(1)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (16, 7), generator=g)
    y = x.roll(-1, 1)
    y[torch.arange(7)[None, :] >= torch.randint(3, 8, (16,), generator=g)[:, None] - 1] = IGNORE
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = tmp_path_factory.mktemp("seqfig") / "lm.zarr"
    with Recorder(path, model, num_classes=13, num_examples=16, optimizer=opt, task="sequence", loss_fn=_loss,
                  snapshot_params="all", snapshot_every=2, param_stats_every=1, grad_norms=True,
                  grad_projection=16) as rec:
        for _ in range(3):
            for i in range(0, 16, 4):
                ids = torch.arange(i, i + 4)
                with rec.step(example_ids=ids, targets=y[ids]) as step:
                    z = model(x[ids])
                    losses = _loss(z, y[ids])
                    step.record(losses=losses, logits=z)
                    losses.mean().backward()
                opt.step()
                opt.zero_grad()
            rec.probe([(x[:8], y[:8], torch.arange(8))])
            rec.evaluate([(x[8:], y[8:], torch.arange(8, 16))])
    return path


# one target per example (the example here is a sequence) or class-pair analyses
PER_EXAMPLE_TARGET = {"loss_trajectories", "loss_trajectories_animation", "loss_change_bars"}
CLASS_PAIRS = {"opposing_pairs_over_time", "opposing_class_matrix", "gradient_cosine_histogram",
               "opposing_gradient_norms", "opposing_group_trajectories"}
DRAWN = {"training_curves", "loss_change_highlight", "majority_opposition", "gradient_sign_heatmap",
         "gradient_sign_heatmap_zoom", "weight_diff_norm", "zero_gradients"}


def test_registry_marks_target_and_class_figures_unavailable(lm_run):
    run = analysis.open_run(lm_run)
    assert run.task == "sequence" and not run.has("train", "target")   # what those figures would read
    for name in PER_EXAMPLE_TARGET | CLASS_PAIRS:
        assert not FIGURES[name].available(run), name
        assert FIGURES[name].skip_reason(run).endswith("this run is sequence"), name
    for name in DRAWN:
        assert FIGURES[name].skip_reason(run) is None, name


def test_cli_figures_on_a_language_model_run(lm_run, tmp_path):
    out = tmp_path / "figs"
    r = CliRunner().invoke(main, ["figures", str(lm_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "failed" not in r.output
    written = {p.stem for p in out.iterdir()}
    assert DRAWN <= written, DRAWN - written
    assert not written & (PER_EXAMPLE_TARGET | CLASS_PAIRS)
    for name in sorted(PER_EXAMPLE_TARGET | CLASS_PAIRS):
        assert f"  skipped {name}: defined for " in r.output and "this run is sequence" in r.output, name
    assert "  skipped data_map: run lacks train/logits" in r.output
    # every figure is accounted for: written, or skipped with its reason
    res = render_all(lm_run, tmp_path / "again", progress=False)
    assert not res.failed
    assert set(res) | set(res.skipped) == set(FIGURES)
    assert all(res.skipped.values())


def test_asking_for_a_figure_the_run_cannot_have_is_an_error(lm_run, tmp_path):
    r = CliRunner().invoke(main, ["figures", str(lm_run), "--out", str(tmp_path), "--only", "loss_trajectories"])
    assert r.exit_code == 1
    assert "figure 'loss_trajectories' failed: defined for classification and regression runs" in r.output
