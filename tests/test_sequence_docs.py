"""The worked example of docs/SEQUENCES.md runs as written, and the README's framework
snippets are the code the integration tests run."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dynascope import analysis
ROOT = Path(__file__).resolve().parents[1]


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_worked_example_runs(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "SEQUENCES.md").read_text()
    example = _blocks(doc.split("## Worked example", 1)[1])[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "SEQUENCES.md", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert out.startswith("sequence ") and "token_accuracy >= 0.5" in out
    run = analysis.open_run(tmp_path / "lm.zarr")
    assert run.status == "complete" and run.train.sizes["step"] == 32 and run.probe.sizes["probe"] == 9
    assert "logits" not in run.train and run.train.token_loss.dtype == np.float16
    # the padding the example made: scored tokens per sequence between 3 and 12
    n = run.train.num_tokens.values
    assert n.min() >= 3 and n.max() <= 12


def test_readme_framework_snippets_are_the_tested_code():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Transformers, Lightning and Hugging Face", 1)[1].split("\n## ", 1)[0]
    blocks = _blocks(section)
    sources = {"lightning": (ROOT / "tests" / "test_integration_lightning.py").read_text(),
               "DynascopeTrainer": (ROOT / "tests" / "test_integration_huggingface.py").read_text()}
    checked = 0
    for block in blocks:
        for key, src in sources.items():
            if key not in block:
                continue
            src = src.replace('tmp_path / "run.zarr"', '"run.zarr"').replace('str(tmp_path / "out")', '"out"')
            tested = {line.strip() for line in src.splitlines()}
            for line in block.splitlines():
                s = line.strip()
                if s and not s.startswith(("#", "import ", "from ", "...")) and s != "trainer.fit(model, loader)":
                    assert s in tested, f"README line not in the {key} test: {s!r}"
            checked += 1
    assert checked == 2
