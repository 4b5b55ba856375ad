"""Figures over many runs: seeds of one configuration averaged (mean, ± sd band), conditions
labelled by what differs, and a TOML batch specification that regenerates everything."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dynascope import analysis
from dynascope.cli import main
from dynascope.figures.batch import load_spec, render_runs
from dynascope.figures.compare import compare_training_curves, conditions
from dynascope.figures.provenance import read_png


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Two seeds of one configuration and one run with another learning rate (2 epochs each)."""
    from dynascope.recorder.driver import TrainConfig, record_run

    base = tmp_path_factory.mktemp("compare")
    out = []
    for name, seed, lr in (("a-seed0", 0, 0.05), ("a-seed1", 1, 0.05), ("b-lr", 0, 0.02)):
        cfg = TrainConfig(dataset="planted", model="cnn", epochs=2, out=str(base / f"{name}.zarr"), batch_size=64,
                          probe_size=32, train_size=128, test_size=64, chunk_steps=4, seed=seed, lr=lr)
        out.append(record_run(cfg, progress=False))
    return out


def test_seeds_are_one_condition_and_differences_label_them(three_runs):
    runs = [analysis.open_run(p) for p in three_runs]
    conds = conditions(runs)
    assert [(label, len(rs)) for label, rs in conds] == [("lr=0.05 (2 seeds)", 2), ("lr=0.02", 1)]


def test_mean_and_band_are_over_seeds(three_runs):
    runs = [analysis.open_run(p) for p in three_runs[:2]]
    fig = compare_training_curves(runs)
    ax = fig.axes[0]
    losses = np.array([analysis.epoch_curves(r)["train_loss"].values for r in runs])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), losses.mean(0))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    sd = losses.std(0, ddof=1)
    assert np.isclose(band.max(), (losses.mean(0) + sd).max()) and np.isclose(band.min(), (losses.mean(0) - sd).min())


def test_figures_for_many_runs_writes_each_and_comparisons(three_runs, tmp_path):
    r = CliRunner().invoke(main, ["figures", *map(str, three_runs), "--out", str(tmp_path), "--only", "training_curves",
                                  "--only", "compare_training_curves", "--only", "compare_forgetting"])
    assert r.exit_code == 0, r.output
    for name in ("a-seed0", "a-seed1", "b-lr"):
        assert (tmp_path / name / "training_curves.png").exists()
    prov = read_png(tmp_path / "compare" / "compare_training_curves.png")
    assert [x["path"] for x in prov["runs"]] == [str(p) for p in three_runs]
    assert "wrote 5 file(s) for 5 figure(s)" in r.output


def test_spec_regenerates_figures_with_style_width_and_params(three_runs, tmp_path):
    spec = tmp_path / "paper.toml"
    spec.write_text(f"""
runs = [{", ".join(repr(str(p)) for p in three_runs[:2])}]
out = "out"
figures = ["training_curves", "compare_training_curves"]
formats = ["png", "pdf"]
style = "paper"
width = "double"
dpi = 150
[params]
forgetting.never_learned = "inf"
[[figure]]
name = "compare_training_curves"
width = "single"
""")
    r = CliRunner().invoke(main, ["figures", "--spec", str(spec)])
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "out" / "a-seed0" / "training_curves.png") as im:
        assert abs(im.width / 150 - 6.9) < 0.01
    with Image.open(tmp_path / "out" / "compare" / "compare_training_curves.png") as im:
        assert abs(im.width / 150 - 3.3) < 0.01           # the [[figure]] entry's own width
    assert (tmp_path / "out" / "compare" / "compare_training_curves.pdf").exists()
    assert load_spec(spec).params == {"forgetting": {"never_learned": "inf"}}


def test_bad_spec_keys_are_named(tmp_path):
    spec = tmp_path / "bad.toml"
    spec.write_text('runs = ["x.zarr"]\nfigure_names = ["data_map"]\n')
    with pytest.raises(ValueError, match="did you mean 'figures'"):
        load_spec(spec)


def test_comparison_on_one_run_is_an_error(three_runs, tmp_path):
    with pytest.raises(ValueError, match="need two or more runs"):
        render_runs([three_runs[0]], tmp_path, names=["compare_training_curves"])


def test_runs_drawn_with_different_saved_parameters_are_refused(three_runs, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["analyze", str(three_runs[0]), "--only", "forgetting", "--save",
                             "--param", "forgetting.source=probe"])
    assert r.exit_code == 0, r.output
    args = ["figures", *map(str, three_runs[:2]), "--out", str(tmp_path), "--only", "compare_forgetting"]
    r = runner.invoke(main, args)
    assert r.exit_code == 1 and "use different parameters (source)" in r.stderr
    assert not (tmp_path / "compare" / "compare_forgetting.png").exists()
    r = runner.invoke(main, args + ["--param", "forgetting.source=train"])
    assert r.exit_code == 0, r.output
    uses = read_png(tmp_path / "compare" / "compare_forgetting.png")["analyses"]
    assert {u["params"]["source"] for u in uses} == {"train"}
