"""The HTML report: sections with a navigation bar, the configuration, opposing-signal findings
with their montage, scores against ground truth, and (in headless Chromium) every image loads."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from dynascope import analysis
from dynascope.analysis.scoring import score_opposing_groups
from dynascope.figures.report import SECTIONS, write_report

FIGS = ["training_curves", "accuracy_evolution", "opposing_pairs_over_time", "opposing_examples_montage",
        "data_map"]


@pytest.fixture(scope="module")
def report(opposing_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return write_report(opposing_runs["planted"], out, figures=FIGS, animations=False), opposing_runs["planted"]


def test_sections_navigation_and_configuration(report):
    path, run_path = report
    text = path.read_text()
    for key, title in SECTIONS.items():
        assert f"<section id='{key}'><h2>{title}</h2>" in text and f"<a href='#{key}'>{title}</a>" in text
    run = analysis.open_run(run_path)
    assert f"<td>run id</td><td>{run.attrs['run_id']}</td>" in text
    assert "<td>lr</td><td>0.05</td>" in text
    assert "opposing_examples_montage.png" in text.split("<section id='opposing'>")[1].split("</section>")[0]


def test_ground_truth_scores_match_an_independent_count(report):
    path, run_path = report
    run = analysis.open_run(run_path)
    g = analysis.opposing_groups(run)
    truth = run.ground_truth["has_planted_feature"].values[g["example_id"].values]
    det = g["detected"].values
    precision = (det & truth).sum() / det.sum()
    recall = (det & truth).sum() / truth.sum()
    s = score_opposing_groups(run, g)
    assert float(s["precision"]) == pytest.approx(precision) and float(s["recall"]) == pytest.approx(recall)
    text = path.read_text()
    assert f"<td>recall</td><td>{recall:.4g}</td>" in text
    assert re.search(r"<td>aum</td><td>0\.\d+</td>", text)          # AUROC of each mislabel score
    summary = (path.parent / "summary.txt").read_text()
    assert f"recall {recall:.2f}" in summary


def test_captions_are_whole_in_the_report(report):
    from dynascope import figures
    path, _ = report
    text = path.read_text()
    for name in FIGS:
        desc = figures.FIGURES[name].description
        assert desc.endswith(".")
        assert f"<b>{name}</b>: {desc.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}" in \
            text.replace("&#x27;", "'").replace("&quot;", '"')


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  const p = document.createElement('pre'); p.id = 'image-check';
  p.textContent = 'IMAGES ' + imgs.length + ' BROKEN ' + JSON.stringify(broken);
  document.body.appendChild(p);
});
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium) to render the report")
def test_every_image_loads_in_headless_chromium(report, tmp_path):
    path, _ = report
    # a copy beside the report, so relative image paths resolve exactly as the report's do
    probe = path.parent / "report_check.html"
    probe.write_text(path.read_text().replace("</body>", CHECK))
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"IMAGES (\d+) BROKEN (\[.*?\])", out.stdout)
    assert m, f"chromium printed no image check: {out.stderr[-500:]}"
    n, broken = int(m.group(1)), m.group(2)
    assert n >= len(FIGS) and broken == "[]", broken
    # and a deliberately missing image is caught, so the check can fail
    probe.write_text(path.read_text().replace("</body>", "<img src='figures/missing.png'>" + CHECK))
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert '"figures/missing.png"' in out.stdout


def test_every_figure_module_has_a_report_section():
    from dynascope.figures.registry import FIGURES
    from dynascope.figures.report import FIGURE_SECTION, MODULE_SECTION, section_of

    unplaced = [e.name for e in FIGURES.values()
                if e.name not in FIGURE_SECTION and e.func.__module__ not in MODULE_SECTION]
    assert not unplaced   # a figure in a new module would otherwise fall into "Example dynamics"
    assert section_of(FIGURES["gradient_sign_heatmap_zoom"]) == "optimisation"
