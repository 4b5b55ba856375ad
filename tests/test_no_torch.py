"""analysis/ and figures/ work on a machine without torch: importing torch is made to fail
in a subprocess, which then analyzes a recorded run and renders its figures."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed on this machine (test)")
    sys.meta_path.insert(0, _NoTorch())
    from dynascope import analysis, figures
    from dynascope import cli, analyze, describe
    run = analysis.open_run(sys.argv[1])
    results = analyze.run_analyses(sys.argv[1], echo=lambda *_: None)
    written = figures.render_all(run, sys.argv[2], progress=False, animations=False)
    assert "torch" not in sys.modules, "torch was imported"
    print(len(results), len(written))
""")


def test_analysis_and_figures_run_without_torch(tiny_run, tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_run), str(tmp_path / "figs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    n_results, n_figures = map(int, out.stdout.split())
    assert n_results >= 4 and n_figures >= 3
    assert (tmp_path / "figs" / "training_curves.png").exists()
    assert "skipped" not in out.stderr, out.stderr


def test_no_torch_import_in_analysis_or_figures_sources():
    root = Path(__file__).resolve().parents[1]
    for pkg in ("analysis", "figures"):
        for f in (root / pkg).rglob("*.py"):
            for line in f.read_text().splitlines():
                s = line.strip()
                assert not (s.startswith("import torch") or s.startswith("from torch")), f"{f}: {s}"
