"""The README's Python API snippets run as written: record a loop, then analyze, save a
result at another threshold, render figures drawn from it and write the report."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    api = text[text.index("## Python API"):]
    api = api[:api.index("\n## ", 1)]  # that section only (the framework sections have their own tests)
    return [b for b in re.findall(r"```python\n(.*?)```", api, re.S) if "Recorder(" in b or "open_run(" in b]


def test_readme_python_snippets_run_as_written(tmp_path):
    blocks = snippets()
    assert len(blocks) == 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    for block in blocks:
        r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    from dynascope.figures.provenance import read_png

    prov = read_png(tmp_path / "figs" / "opposing_pairs_over_time.png")
    assert prov["analyses"][0]["params"]["cos_threshold"] == -0.7 and prov["analyses"][0]["source"] == "saved"
    assert (tmp_path / "report-out" / "report.html").exists()
    assert "<td>aum</td>" in (tmp_path / "report-out" / "report.html").read_text()
