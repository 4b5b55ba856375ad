"""Where a figure came from, written into the file and stated under it: run path(s) and
id, the analyses and the parameters they ran with, dynascope's version and git commit.

A figure file found on its own, months later, can be traced to its run and redrawn.
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import textwrap
from pathlib import Path

# analysis parameters that only trade speed for memory; the footer leaves them out
PERFORMANCE_KNOBS = {"block", "chunk_size", "batch_size", "max_gram_samples", "max_candidates", "method"}


def run_id(run) -> str:
    """The store's run id; stores recorded before ids existed get a stable one derived from
    their creation time and configuration."""
    rid = run.attrs.get("run_id")
    if rid:
        return str(rid)
    basis = json.dumps({"created": run.attrs.get("created"), "config": run.attrs.get("config")},
                       sort_keys=True, default=str)
    return "derived-" + hashlib.sha1(basis.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def dynascope_version() -> str:
    try:
        from importlib.metadata import version

        return version("dynascope")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the dynascope source tree in use, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def record(name: str, runs, uses, figure_params: dict | None = None, caption: str = "") -> dict:
    """The provenance of one figure as a JSON-able dict."""
    from dynascope.analysis.parameters import json_safe

    return {"figure": name, "caption": caption,
            "runs": [{"path": str(r.path), "run_id": run_id(r)} for r in runs],
            "analyses": [{"name": u.name, "params": u.params, "source": u.source} for u in uses],
            "figure_params": json_safe(figure_params or {}),
            "dynascope": dynascope_version(), "git_commit": git_commit()}


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def footer_text(prov: dict) -> str:
    """One short line per figure: each analysis with its parameters (None and speed knobs
    left out), '(saved)' when loaded from the store, and the figure's own parameters."""
    parts, seen = [], set()
    for a in prov["analyses"]:
        key = (a["name"], json.dumps(a["params"], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in a["params"].items()
                       if v is not None and k not in PERFORMANCE_KNOBS and not isinstance(v, (list, dict)))
        parts.append(f"{a['name']}({ps})" + (" saved" if a["source"] == "saved" else ""))
    fp = ", ".join(f"{k}={_fmt(v)}" for k, v in prov["figure_params"].items()
                   if v is not None and not isinstance(v, (list, dict)))
    if fp:
        parts.append(f"figure({fp})")
    runs = ", ".join(Path(r["path"]).name for r in prov["runs"])
    return f"{runs} · " + "; ".join(parts) + f" · dynascope {prov['dynascope']}"


def add_footer(fig, text: str, fontsize: float = 5.0) -> None:
    """State the parameters under the axes, in small grey type, with room reserved for it
    by the layout engine so it never overlaps a label."""
    width_in, height_in = fig.get_size_inches()
    per_line = max(40, int(width_in * 72 / (fontsize * 0.52)))
    lines = textwrap.wrap(text, per_line)[:3]
    if not lines:
        return
    frac = min(0.3, (len(lines) * fontsize * 1.25 + 3) / 72 / height_in)
    engine = fig.get_layout_engine()
    if engine is not None and hasattr(engine, "set") and "rect" in engine.get():
        engine.set(rect=(0, frac, 1, 1 - frac))
    else:
        fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, frac + 0.08))
    fig.text(0.005, 0.004, "\n".join(lines), fontsize=fontsize, color="0.45", ha="left", va="bottom",
             linespacing=1.15)


def file_metadata(prov: dict, fmt: str) -> dict:
    """Metadata for matplotlib's savefig: PNG text chunks, PDF info, SVG Dublin Core."""
    blob = json.dumps(prov, sort_keys=True, default=str)
    runs = "; ".join(f"{r['path']} (run {r['run_id']})" for r in prov["runs"])
    software = f"dynascope {prov['dynascope']}" + (f" (git {prov['git_commit']})" if prov["git_commit"] else "")
    if fmt == "png":
        return {"Title": prov["figure"], "Description": prov["caption"], "Software": software,
                "Source": runs, "dynascope": blob}
    if fmt == "pdf":
        return {"Title": prov["figure"], "Subject": blob, "Creator": software,
                "Keywords": "dynascope; " + runs}
    if fmt == "svg":
        return {"Title": prov["figure"], "Description": prov["caption"] + "\n" + blob,
                "Creator": software, "Source": runs, "Identifier": ",".join(r["run_id"] for r in prov["runs"])}
    return {}


def read_png(path) -> dict:
    """The provenance stored in a PNG written by dynascope (Pillow reads the text chunks)."""
    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["dynascope"])
