"""Every feature-signal figure renders from a hand-built store (no torch)."""
import numpy as np
import pytest

from dynascope.figures.registry import FIGURES
from dynascope.figures.render import render_figure

from test_features_analysis import make_run

NAMES = ["layer_correlation_grid", "cka_heatmap", "cka_evolution", "layer_correlation_evolution",
         "feature_correlation", "sample_correlation", "augmentation_montage", "augmentation_invariance",
         "augmentation_view_correlation"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 24, 6))
    b = np.maximum(a @ rng.normal(size=(6, 8)), 0)
    b[..., 0] = 0.0
    acts = {"fc1": a, "relu1": b, "fc2": b @ rng.normal(size=(8, 3))}
    views = rng.normal(size=(2, 10, 8))
    aug = {"relu1": (views, rng.normal(size=(12, 8))), "fc2": (views[..., :3], rng.normal(size=(12, 3)))}
    r = make_run(tmp_path_factory.mktemp("fig") / "f.zarr", acts, aug)
    import zarr

    g = zarr.open_group(str(r.path / "augmentation"), mode="r+")
    m = g.create_array("montage", shape=(5, 1, 6, 6), dtype="float32", dimension_names=["view", "channel", "y", "x"])
    m[...] = rng.normal(size=(5, 1, 6, 6))
    m.attrs["sample_id"] = 100
    from dynascope.analysis.run import open_run

    return open_run(r.path)


@pytest.mark.parametrize("name", NAMES)
def test_renders(run, name, tmp_path):
    assert FIGURES[name].available(run)
    paths = render_figure(run, name, tmp_path)
    assert paths[0].stat().st_size > 5000
