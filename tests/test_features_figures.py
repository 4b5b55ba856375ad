"""Every feature-signal figure renders from a hand-built store (no torch)."""
import matplotlib.pyplot as plt
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
    base = rng.normal(size=(1, 6, 6)) + 0.5
    views = [base] + [np.zeros_like(base) for _ in range(4)]
    for k, v in enumerate(views[1:], 1):   # shifted down by k pixels; the vacated rows filled with 0
        v[:, k:] = base[:, :6 - k]
    m[...] = np.stack(views)
    m.attrs["sample_id"] = 100
    from dynascope.analysis.run import open_run

    return open_run(r.path)


@pytest.mark.parametrize("name", NAMES)
def test_renders(run, name, tmp_path):
    assert FIGURES[name].available(run)
    paths = render_figure(run, name, tmp_path)
    assert paths[0].stat().st_size > 5000


def test_montage_scales_each_image_and_marks_the_filled_pixels(run):
    from dynascope.figures.augmentation import display_range

    m = run.group("augmentation")["montage"].values
    fig = FIGURES["augmentation_montage"].func(run, smooth=0.0)   # one row: the images as fed
    try:
        axes = [ax for ax in fig.axes if ax.get_images()]
        assert [ax.get_title() for ax in axes] == ["input #100"] + [f"view {k}" for k in range(1, 5)]
        for k, ax in enumerate(axes):
            images = ax.get_images()
            keep = np.ones((6, 6), bool)
            keep[:k] = False                                   # view k: its first k rows are fill
            lo, hi = np.percentile(m[k][:, keep], [1, 99])     # each image's own range, fill excluded
            np.testing.assert_allclose(images[0].get_array(), np.clip((m[k][0] - lo) / (hi - lo), 0, 1), rtol=1e-6)
            assert display_range(m[k], keep) == pytest.approx((lo, hi))
            if k:
                overlay = np.asarray(images[1].get_array())[..., 3] > 0
                np.testing.assert_array_equal(overlay, ~keep)
                rms = np.sqrt(np.mean((m[k] - m[0]) ** 2)) / m[0].std()
                assert ax.get_xlabel() == f"Δ {rms:.2f}"
            else:
                assert len(images) == 1                           # nothing filled in the input
    finally:
        plt.close(fig)


def test_montage_smoothing_is_a_gaussian_blur():
    from dynascope.figures.augmentation import smoothed

    img = np.zeros((1, 9, 9))
    img[0, 4, 4] = 1.0
    out = smoothed(img, 1.0)
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k /= k.sum()
    np.testing.assert_allclose(out[0, 1:8, 1:8], np.outer(k, k), rtol=1e-10)   # an impulse gives the kernel
    assert out.sum() == pytest.approx(1.0)
    assert smoothed(img, 0) is img
