"""The command line: readable output on success, one clear line on bad input."""
from __future__ import annotations

import shutil

from click.testing import CliRunner

from dynascope import analysis
from dynascope.cli import main


def test_info_describes_progress_and_groups(tiny_run):
    r = CliRunner().invoke(main, ["info", str(tiny_run)])
    assert r.exit_code == 0, r.output
    assert "status=complete" in r.output and "train=18" in r.output
    assert "example_id" in r.output and "planted" in r.output


def test_analyze_saves_results_with_params(tiny_run, tmp_path):
    path = tmp_path / "run.zarr"
    shutil.copytree(tiny_run, path)
    r = CliRunner().invoke(main, ["analyze", str(path), "--only", "loss_trajectories", "--save",
                                  "--param", "loss_trajectories.source=train"])
    assert r.exit_code == 0, r.output
    assert "last epoch held-out" in r.output
    saved = analysis.load_result(path, "loss_trajectories")
    assert saved.attrs["params"] == {"source": "train"} and saved.sizes["epoch"] == 3


def test_figures_render_pngs(tiny_run, tmp_path):
    r = CliRunner().invoke(main, ["figures", str(tiny_run), "--out", str(tmp_path), "--only", "training_curves",
                                  "--format", "png,svg"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "training_curves.svg").exists()


def test_bad_inputs_give_one_line_errors(tiny_run, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["info", str(tmp_path / "missing.zarr")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["analyze", str(tiny_run), "--only", "nonsense"])
    assert r.exit_code == 1 and "unknown analysis" in r.output
    r = runner.invoke(main, ["analyze", str(tiny_run), "--param", "oops"])
    assert r.exit_code == 1 and "NAME.KEY=VALUE" in r.output
    r = runner.invoke(main, ["record", "--out", str(tiny_run), "--epochs", "1"])
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    assert analysis.open_run(tiny_run).status == "complete"   # untouched
    r = runner.invoke(main, ["record", "--out", str(tmp_path / "x.zarr"), "--dataset", "cifar10",
                             "--data-dir", str(tmp_path)])
    assert r.exit_code == 1 and "--download" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.zarr").exists()
