"""Figures for publication: parameters that reach the figure (saved or --param), provenance in
every file, physical width and TrueType fonts, complete captions, an honest CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dynascope import analysis
from dynascope import figures
from dynascope.analysis import parameters
from dynascope.analysis.registry import first_paragraph
from dynascope.cli import main
from dynascope.figures.compare import COMPARISONS
from dynascope.figures.provenance import read_png


@pytest.fixture(scope="module")
def opp_copy(opposing_runs, tmp_path_factory):
    """A private copy of the planted opposing run (tests here save results into it)."""
    path = tmp_path_factory.mktemp("pub") / "planted.zarr"
    shutil.copytree(opposing_runs["planted"], path)
    return path


def _pair_counts(fig):
    ax = fig.axes[0]
    return ax.get_title(), np.asarray(ax.lines[0].get_ydata())


def test_saved_threshold_reaches_the_figure(opp_copy, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["analyze", str(opp_copy), "--only", "opposing_pairs", "--save",
                             "--param", "opposing_pairs.cos_threshold=-0.7"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["figures", str(opp_copy), "--out", str(tmp_path), "--only", "opposing_pairs_over_time",
                             "--only", "gradient_cosine_histogram"])
    assert r.exit_code == 0, r.output
    prov = read_png(tmp_path / "opposing_pairs_over_time.png")
    (use,) = prov["analyses"]
    assert use["name"] == "opposing_pairs" and use["params"]["cos_threshold"] == -0.7 and use["source"] == "saved"
    hist = read_png(tmp_path / "gradient_cosine_histogram.png")
    assert any(u["name"] == "opposing_pairs" and u["params"]["cos_threshold"] == -0.7 for u in hist["analyses"])

    # the counts drawn are those at -0.7, computed independently here (and differ from -0.5)
    run = analysis.open_run(opp_copy)
    with parameters.use():
        title, drawn = _pair_counts(figures.FIGURES["opposing_pairs_over_time"].func(run))
    truth = analysis.opposing_pairs(run, cos_threshold=-0.7)["pair_count"].values
    default = analysis.opposing_pairs(run)["pair_count"].values
    assert "cos ≤ -0.7" in title
    np.testing.assert_array_equal(drawn, truth)
    assert not np.array_equal(truth, default)


def test_param_beats_saved_and_is_stated(opp_copy, tmp_path):
    r = CliRunner().invoke(main, ["figures", str(opp_copy), "--out", str(tmp_path), "--only", "opposing_pairs_over_time",
                                  "--param", "opposing_pairs.cos_threshold=-0.9"])
    assert r.exit_code == 0, r.output
    (use,) = read_png(tmp_path / "opposing_pairs_over_time.png")["analyses"]
    assert use["params"]["cos_threshold"] == -0.9 and use["source"] == "computed"
    run = analysis.open_run(opp_copy)
    with parameters.use({"opposing_pairs": {"cos_threshold": -0.9}}):
        fig = figures.FIGURES["opposing_pairs_over_time"].func(run)
        figures.render.finish(fig, "opposing_pairs_over_time", [run], parameters.current().uses, {},
                              tmp_path / "again", ("png",))
    footer = [t.get_text() for t in fig.texts]
    assert any("cos_threshold=-0.9" in t for t in footer)


def test_provenance_in_png_pdf_and_svg(tiny_run, tmp_path):
    from pypdf import PdfReader

    r = CliRunner().invoke(main, ["figures", str(tiny_run), "--out", str(tmp_path), "--only", "training_curves",
                                  "--format", "png,pdf,svg", "--width", "single", "--style", "paper", "--dpi", "200"])
    assert r.exit_code == 0, r.output
    run = analysis.open_run(tiny_run)
    rid = run.attrs["run_id"]
    assert len(rid) == 32
    prov = read_png(tmp_path / "training_curves.png")
    assert prov["runs"] == [{"path": str(tiny_run), "run_id": rid}]
    assert prov["analyses"][0]["name"] == "epoch_curves" and prov["dynascope"]
    assert "git_commit" in prov
    with Image.open(tmp_path / "training_curves.png") as im:
        assert abs(im.width / 200 - 3.3) < 0.01          # physical width: 3.3 in at 200 dpi
        assert im.text["Source"].startswith(str(tiny_run))
    pdf = PdfReader(tmp_path / "training_curves.pdf")
    meta = json.loads(pdf.metadata["/Subject"])
    assert meta["runs"][0]["run_id"] == rid and meta["analyses"] == prov["analyses"]
    box = pdf.pages[0].mediabox
    assert float(box.width) == pytest.approx(3.3 * 72, abs=0.01)
    fonts = [f.get_object() for f in pdf.pages[0]["/Resources"]["/Font"].values()]
    assert fonts and all(f["/Subtype"] in ("/TrueType", "/Type0") for f in fonts)   # Type 42, never Type 3
    svg = (tmp_path / "training_curves.svg").read_text()
    assert "<dc:title>training_curves</dc:title>" in svg and rid in svg


def test_type42_in_postscript_too():
    import matplotlib

    from dynascope.figures.style import RC

    assert RC["pdf.fonttype"] == 42 and RC["ps.fonttype"] == 42
    with figures.figure_style():
        assert matplotlib.rcParams["ps.fonttype"] == 42


def test_captions_are_complete_sentences():
    entries = [(n, e.func, e.description) for n, e in figures.FIGURES.items()]
    entries += [(n, e.func, e.description) for n, e in analysis.ANALYSES.items()]
    entries += [(n, c.func, c.description) for n, c in COMPARISONS.items()]
    for name, func, caption in entries:
        assert caption.endswith("."), f"{name}: caption does not end with a full stop: {caption!r}"
        assert caption == first_paragraph(func.__doc__), name
        assert "  " not in caption and "\n" not in caption, name


def test_list_shows_parameters_and_defaults():
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0, r.output
    assert "opposing_pairs" in r.output and "cos_threshold=-0.5" in r.output
    assert "compare_training_curves" in r.output and "majority_opposition" in r.output
    cat = json.loads(CliRunner().invoke(main, ["list", "--json"]).output)
    assert cat["analyses"]["forgetting"]["params"]["never_learned"] == "presentations"
    assert set(cat["figures"]) == set(figures.FIGURES)


def test_unknown_names_suggest_close_matches(tiny_run, tmp_path):
    runner = CliRunner()
    for args, want in ((["figures", str(tiny_run), "--out", str(tmp_path), "--only", "training_curve"],
                        "did you mean 'training_curves'"),
                       (["analyze", str(tiny_run), "--only", "forgeting"], "did you mean 'forgetting'"),
                       (["figures", str(tiny_run), "--out", str(tmp_path), "--param", "forgetting.never_lerned=inf"],
                        "did you mean 'never_learned'")):
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and want in r.output and "Traceback" not in r.output, r.output
    assert not list(tmp_path.glob("*.png"))


def test_a_failed_figure_exits_nonzero_and_keeps_the_others(tiny_run, tmp_path, monkeypatch):
    from dynascope.figures.registry import FIGURES, FigureEntry

    def boom(run):
        """Always fails."""
        raise RuntimeError("no luck\nsecond line")

    monkeypatch.setitem(FIGURES, "boom", FigureEntry("boom", boom, ("train",), "Always fails."))
    r = CliRunner().invoke(main, ["figures", str(tiny_run), "--out", str(tmp_path), "--only", "boom",
                                  "--only", "training_curves"])
    assert r.exit_code == 1
    assert "figure 'boom' failed: RuntimeError: no luck" in r.stderr and "second line" not in r.stderr
    assert (tmp_path / "training_curves.png").exists()
    assert "1 failed" in r.stdout


def test_summary_names_the_forgetting_convention(tiny_run):
    f = analysis.forgetting(analysis.open_run(tiny_run))
    line = analysis.ANALYSES["forgetting"].summary(f)
    ev, never = f["forgetting_events"].values, f["never_learned"].values.astype(bool)
    assert f"mean {ev[~never].mean():.2f} forgetting events per learned example" in line
    assert "never-learned examples excluded" in line


def test_majority_opposition_on_a_run_shorter_than_its_window(tmp_path):
    from dynascope.recorder.driver import TrainConfig, record_run

    path = record_run(TrainConfig(dataset="planted", model="cnn", epochs=1, out=str(tmp_path / "short.zarr"),
                                  batch_size=64, probe_size=32, train_size=192, test_size=32, chunk_steps=4,
                                  grad_proj_dim=64), progress=False)
    run = analysis.open_run(path)
    assert run.train.sizes["step"] == 3 < 9
    fig = figures.FIGURES["majority_opposition"].func(run)     # window=9 by default
    raw, smooth = (np.asarray(line.get_ydata()) for line in fig.axes[0].lines[:2])
    # centred mean with the window clipped to the 3 steps: [mean(0,1), mean(0,1,2), mean(1,2)]
    want = np.array([raw[:2].mean(), raw.mean(), raw[1:].mean()])
    np.testing.assert_allclose(smooth, want)
    assert "centred 3-step mean" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_centred_smoothing_keeps_the_peak_in_place():
    import xarray as xr

    from dynascope.analysis.gradient_dynamics import _rolling_mean
    from dynascope.figures.smooth import centred_mean

    x = np.exp(-0.5 * ((np.arange(200) - 60) / 8.0) ** 2)          # a peak at step 60
    for smooth in (centred_mean(x, 50), _rolling_mean(xr.DataArray(x, dims="step"), 50).values):
        assert int(np.argmax(smooth)) in (59, 60, 61)
        assert smooth[60] == pytest.approx(x[35:85].mean())        # 25 before, 24 after: centred
    trailing = xr.DataArray(x, dims="step").rolling(step=50, min_periods=1).mean().values
    assert int(np.argmax(trailing)) > 75                           # what the old figure drew
