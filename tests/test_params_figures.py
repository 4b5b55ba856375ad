"""The optimization-insight figures render from a tiny recorded run, with labelled axes."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from dynascope import analysis
from dynascope.analysis import open_run
from dynascope.figures import FIGURES
from dynascope.figures.optimization import _downsample, fmt_threshold
from dynascope.recorder import Recorder

torch.set_num_threads(1)
NAMES = ["zero_gradients", "released_fraction", "sign_flip_fraction", "weight_diff_norm",
         "gradient_sign_heatmap", "gradient_sign_heatmap_zoom", "curvature_classes", "dead_units"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("opt") / "run.zarr"
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    with Recorder(path, net, num_classes=3, num_examples=64, optimizer=opt,
                  snapshot_params="all", snapshot_every=2, param_stats_every=1) as rec:
        for t in range(12):
            idx = torch.arange(16) + 16 * (t % 4)
            with rec.step(example_ids=idx, targets=y[idx]) as st:
                logits = net(x[idx])
                losses = torch.nn.functional.cross_entropy(logits, y[idx], reduction="none")
                st.record(losses=losses, logits=logits)
                losses.mean().backward()
            opt.step()
            opt.zero_grad()
    return open_run(path)


@pytest.mark.parametrize("name", NAMES)
def test_figure_renders_with_labels(tiny_run, name):
    entry = FIGURES[name]
    assert entry.available(tiny_run)
    fig = entry.func(tiny_run)
    try:
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
    finally:
        plt.close(fig)


def test_heatmap_downsampling_is_the_mean_sign_per_column():
    sign = np.array([[1, -1, 0, 1, 1, 1, -1]], np.int8)   # tensors of 4 and 3 components
    img, starts, cols = _downsample(sign, np.array([0, 4]), max_columns=4)
    assert cols.tolist() == [2, 2] and starts.tolist() == [0, 2]
    np.testing.assert_array_equal(img, [[0.0, 0.5, 1.0, -1.0]])
    # a tensor smaller than its share repeats its components over several columns
    img, _, cols = _downsample(np.array([[1, -1, 0, 1, 1, 1, -1]], np.int8), np.array([0, 6]), 40)
    assert cols[1] > 1 and (img[0, cols[0]:] == -1).all()


def test_threshold_labels():
    assert fmt_threshold(1e-7) == "$10^{-7}$"
    assert fmt_threshold(5e-6) == "$5\\times10^{-6}$"
    assert fmt_threshold(0) == "0"


def test_zoom_defaults_to_the_window_with_most_near_zero_gradients(tiny_run):
    from dynascope.figures.sign_zoom import near_zero_window

    marked = np.zeros((2, 10), bool)
    marked[0, [1, 6, 7]] = marked[1, [7, 8]] = True
    assert near_zero_window(marked, 3) == 6            # columns 6-8 hold 4 marked cells
    assert near_zero_window(np.zeros((2, 10), bool), 3) is None

    eps, width = 1e-5, 40
    snap = tiny_run.group("snapshots")
    signs = analysis.gradient_signs(tiny_run, eps=eps)
    g = np.concatenate([np.abs(snap[f"grad__{str(k).replace('.', '__')}"].values).reshape(signs.sizes["snapshot"], -1)
                        for k in signs["param_name"].values], axis=1)
    near = (g <= eps).sum(0)
    best = max(range(near.size - width + 1), key=lambda s: (near[s:s + width].sum(), -s))   # brute force
    fig = FIGURES["gradient_sign_heatmap_zoom"].func(tiny_run, eps=eps, width=width)
    try:
        top, ax = fig.axes[:2]
        (im,) = ax.get_images()
        assert near.sum() > 0   # some |g| <= eps in this run, so the default window is the near-zero one
        np.testing.assert_array_equal(im.get_array(), signs["sign"].values[:, best:best + width])
        np.testing.assert_allclose([p.get_height() for p in top.patches], (g <= eps)[:, best:best + width].mean(0))
        starts = signs["param_start"].values
        spans = {str(n): min(s1, best + width) - max(s0, best)
                 for n, s0, s1 in zip(signs["param_name"].values, starts, np.append(starts[1:], near.size))}
        named = [t.get_text().split("\n")[0] for t in top.get_xticklabels() if t.get_text()]
        assert named == [n for n, w in spans.items() if w >= 0.12 * width]
        assert named and all(w > 0 for n, w in spans.items() if n in named)
        shares = [t.get_text().split("(")[1] for t in fig.axes[-1].get_yticklabels()]
        assert shares[1] == ("<1% of cells)" if 0 < (im.get_array() == 0).mean() < 0.005
                             else f"{(im.get_array() == 0).mean():.0%} of cells)")
    finally:
        plt.close(fig)
