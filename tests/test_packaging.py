"""The packages install as dynascope.recorder / dynascope.analysis / dynascope.figures, so a
user's own analysis.py or figures.py next to their script cannot shadow them (or be shadowed)."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dynascope": "dynascope", "recorder": "dynascope.recorder",
           "analysis": "dynascope.analysis", "figures": "dynascope.figures"}


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_no_source_imports_the_bare_top_level_names():
    bare = re.compile(r"^\s*(from|import) (analysis|figures|recorder)\b")
    for folder in (*FOLDERS, "tests", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                assert not bare.match(line), f"{f.relative_to(ROOT)}:{i}: {line.strip()}"


def test_a_users_own_analysis_and_figures_modules_do_not_collide(tmp_path):
    (tmp_path / "analysis.py").write_text("WHO = 'user analysis'\n")
    (tmp_path / "figures.py").write_text("WHO = 'user figures'\n")
    code = ("import analysis, figures\n"
            "from dynascope import analysis as A, figures as F\n"
            "from dynascope.figures import style\n"
            "print(analysis.WHO, figures.WHO, hasattr(A, 'open_run'), hasattr(F, 'render_all'),\n"
            "      type(style).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["user", "analysis", "user", "figures", "True", "True", "module"]


def test_every_relative_import_names_a_module_that_exists():
    """Lazy imports inside functions run only on some paths (the driver's augmentation pass,
    for one), so check statically that each `from .x import` / `from ..x import` resolves."""
    import ast

    missing = []
    for folder in FOLDERS:
        for f in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if not isinstance(node, ast.ImportFrom) or not node.level:
                    continue
                base = f.parent
                for _ in range(node.level - 1):
                    base = base.parent
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    target = base.joinpath(*name.split("."))
                    if not (target.with_suffix(".py").exists() or (target / "__init__.py").exists()):
                        missing.append(f"{f.relative_to(ROOT)}:{node.lineno}: {'.' * node.level}{name}")
    assert not missing, missing
