"""Example-dynamics figures, animations and the report on a small synthetic run: they render,
and what they draw is the analysis result (checked exactly, not just 'a file exists')."""
import numpy as np
import pytest
from PIL import Image

from dynascope import analysis
from dynascope.analysis import open_run
from dynascope.figures import FIGURES, render_figure
from dynascope.figures.animations import sample_frames
from dynascope.figures.report import key_numbers, write_report
from helpers_dynamics import learning_run

MINE = ["difficulty_evolution", "accuracy_evolution", "data_map", "confidence_evolution",
        "loss_change_highlight"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return open_run(learning_run(tmp_path_factory.mktemp("fig") / "run.zarr"))


def test_registered_with_needs(run):
    for name in MINE + ["training_animation", "loss_trajectories_animation"]:
        assert FIGURES[name].needs and FIGURES[name].available(run), name
    assert FIGURES["training_animation"].kind == "animation"


@pytest.mark.parametrize("name", MINE)
def test_figures_render(run, name, tmp_path):
    (png,) = render_figure(run, name, tmp_path)
    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 400


def test_data_map_draws_cartography(run):
    fig = FIGURES["data_map"].func(run)
    ax = fig.axes[0]
    carto = analysis.cartography(run)
    pts = ax.collections[0].get_offsets()
    np.testing.assert_allclose(pts[:, 0], carto["variability"].values)
    np.testing.assert_allclose(pts[:, 1], carto["confidence"].values)
    np.testing.assert_allclose(ax.collections[0].get_array(), carto["correctness"].values)
    circled = ax.collections[1].get_offsets()  # flipped labels 3 and 17
    np.testing.assert_allclose(circled[:, 1], carto["confidence"].sel(example=[3, 17]).values)
    assert ax.get_xlabel().startswith("variability") and ax.get_ylabel().startswith("confidence")


def test_forgetting_histogram_counts(run):
    fig = FIGURES["difficulty_evolution"].func(run)
    ax = fig.axes[2]
    f = analysis.forgetting(run)
    learned = f["forgetting_events"].values[~f["never_learned"].values].astype(int)
    heights = [p.get_height() for p in ax.patches]
    expected = list(np.bincount(learned)) + [int(f["never_learned"].sum())]
    assert heights == expected


def test_sample_frames():
    assert list(sample_frames(5, None)) == [0, 1, 2, 3, 4]
    assert list(sample_frames(5, 10)) == [0, 1, 2, 3, 4]
    assert list(sample_frames(11, 3)) == [0, 5, 10]
    assert list(sample_frames(100, 1)) == [99]
    with pytest.raises(ValueError):
        sample_frames(0, 3)


@pytest.mark.parametrize("name", ["training_animation", "loss_trajectories_animation"])
def test_animation_frames_and_fps(run, name, tmp_path):
    path = tmp_path / f"{name}.gif"
    FIGURES[name].func(run, path, fps=4, max_frames=4)  # 6 epochs / 7 probes sampled to 4
    with Image.open(path) as im:
        assert im.n_frames == 4
        assert im.info["duration"] == 250  # ms per frame at 4 fps


def test_report(run, tmp_path):
    html = write_report(run.path, tmp_path, figures=MINE, animations=False, top_k=4)
    text = html.read_text()
    summary = (tmp_path / "summary.txt").read_text()
    for name in MINE:
        assert f"figures/{name}.png" in text and (tmp_path / "figures" / f"{name}.png").exists()
    assert "figures/hardest_examples.png" in text and (tmp_path / "figures" / "hardest_examples.png").exists()
    # the two flipped labels have the lowest AUM: first two rows of the hardest table
    a = analysis.aum(run)["aum"]
    hardest = a["example"].values[np.argsort(a.values)[:2]]
    assert set(hardest) == {3, 17}
    block = summary.split("Hardest examples")[1].splitlines()[3:5]
    assert {int(line.split()[0]) for line in block} == {3, 17}
    assert "yes" in block[0] and "yes" in block[1]
    nums = key_numbers(run)
    assert nums["epochs"] == 6 and nums["examples presented"] == 40
    assert nums["final held-out accuracy (%)"] == 100.0  # eval logits favour the gold class by epoch 5
    assert "final held-out accuracy (%): 100" in summary
    assert "aum: 1" in summary  # AUROC 1 on this construction
