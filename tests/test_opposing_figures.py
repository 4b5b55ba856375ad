"""Every opposing-signal figure renders on a synthetic store, is registered with what it
needs, and is skipped (not broken) on a run without gradient projections."""
from __future__ import annotations

import pytest
import zarr

from dynascope import analysis
from dynascope.figures import FIGURES, available_figures
from dynascope.figures.render import render_figure
from opposing_synth import write_synthetic_run

NAMES = ["opposing_pairs_over_time", "opposing_class_matrix", "gradient_cosine_histogram",
         "loss_change_bars", "opposing_gradient_norms", "opposing_group_trajectories",
         "opposing_examples_montage", "majority_opposition"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return analysis.open_run(write_synthetic_run(tmp_path_factory.mktemp("oppf") / "s.zarr"))


@pytest.mark.parametrize("name", NAMES)
def test_renders(synth, name, tmp_path):
    assert FIGURES[name].available(synth)
    (path,) = render_figure(synth, name, tmp_path)
    assert path.stat().st_size > 10_000


def test_pairs_montage_variant(synth, tmp_path):
    (path,) = render_figure(synth, "opposing_examples_montage", tmp_path, pairs=True)
    assert path.stat().st_size > 10_000


def test_not_offered_without_projections(tmp_path):
    path = write_synthetic_run(tmp_path / "r.zarr", with_examples=False)
    for group in ("probe", "train"):
        zarr.open_group(str(path), mode="r+")[group].__delitem__("grad_proj")
    offered = {f.name for f in available_figures(analysis.open_run(path))}
    assert offered & set(NAMES) == {"loss_change_bars"}
