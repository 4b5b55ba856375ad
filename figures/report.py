"""The run report: summary.txt plus report.html with every available figure (PNG, embedded by
relative path), animations, key numbers, and the hardest and most-forgotten examples
(tables, and image montages when the store has thumbnails).

    write_report("run.zarr", "report/")   # -> report/report.html  (CLI: dynascope report)
"""
from __future__ import annotations

import html
import sys
from pathlib import Path

import numpy as np

import analysis
from analysis.run import Run, open_run

from .montage import example_images, montage
from .registry import FIGURES, available_figures
from .render import render_figure
from .style import save_figure

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}figure{margin:1.2em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}.note{color:#777;font-size:.9em}"""


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return str(v)


def key_numbers(run: Run) -> dict[str, object]:
    """Headline numbers of a run: size, final accuracies and gap, forgetting statistics."""
    out: dict[str, object] = {"status": run.status, "dataset": run.dataset.get("name", "?"),
                              "training examples": run.dataset.get("num_examples", "?"),
                              "classes": run.num_classes, "recorded steps": run.train.sizes.get("step", 0)}
    e = analysis.epoch_curves(run)
    last = e.isel(epoch=-1)
    out["epochs"] = int(e.sizes["epoch"])
    out["final train loss"] = float(last["train_loss"])
    if "train_accuracy" in last:
        out["final train accuracy (%)"] = 100 * float(last["train_accuracy"])
    if "eval_accuracy" in last:
        out["final held-out accuracy (%)"] = 100 * float(last["eval_accuracy"])
        gap = float(last["train_accuracy"] - last["eval_accuracy"])
        out["final generalisation gap, train - held-out (pp)"] = 100 * gap
    if run.has("train", "logits"):
        f = analysis.forgetting(run, never_learned="exclude")
        out["examples presented"] = int(f.sizes["example"])
        out["unforgettable examples"] = int(f["unforgettable"].sum())
        out["never-learned examples"] = int(f["never_learned"].sum())
        out["forgetting events (total, learned examples)"] = int(np.nansum(f["forgetting_events"].values))
        out["mean forgetting events per learned example"] = float(np.nanmean(f["forgetting_events"].values))
    return out


def _namer(names):
    return lambda c: names[int(c)] if 0 <= int(c) < len(names) else str(c)


def _example_sets(run: Run, top_k: int) -> list[dict]:
    """Hardest (lowest AUM) and most-forgotten examples with their statistics."""
    f = analysis.forgetting(run, never_learned="inf")
    a = analysis.aum(run)
    m = analysis.cartography(run)
    ids = f["example"].values
    gt = run.ground_truth if run.has("ground_truth", "is_mislabeled") else None
    table = {"label": f["target"].values, "forgetting events": f["forgetting_events"].values,
             "confidence": m["confidence"].values, "AUM": a["aum"].values}
    if gt is not None:
        table["flipped label"] = gt["is_mislabeled"].values[ids].astype(bool)
        if "clean_target" in gt:
            table["clean label"] = gt["clean_target"].values[ids]
    hard = np.argsort(table["AUM"], kind="stable")[:top_k]
    fe = np.where(np.isinf(table["forgetting events"]), -1, table["forgetting events"])
    forgotten = np.lexsort((table["AUM"], -fe))[:top_k]
    forgotten = forgotten[fe[forgotten] > 0]
    return [{"key": "hardest", "title": f"Hardest examples (lowest area under the margin, top {top_k})",
             "rows": hard, "ids": ids, "table": table},
            {"key": "most_forgotten", "title": f"Most-forgotten examples (top {top_k})",
             "rows": forgotten, "ids": ids, "table": table}]


def _render_rows(run: Run, s: dict) -> tuple[list[str], list[list[str]]]:
    names = run.class_names
    cls = _namer(names)
    header = ["example"] + list(s["table"])
    rows = []
    for r in s["rows"]:
        row = [str(int(s["ids"][r]))]
        for key, col in s["table"].items():
            v = col[r]
            if key == "forgetting events" and np.isinf(v):
                row.append("never learned")
                continue
            if key in ("label", "clean label"):
                row.append(cls(v))
            elif isinstance(v, (bool, np.bool_)):
                row.append("yes" if v else "no")
            else:
                row.append(_fmt(v))
        rows.append(row)
    return header, rows


def _montage_png(run: Run, s: dict, out_dir: Path) -> Path | None:
    ids = s["ids"][s["rows"]]
    images = example_images(run, ids)
    if images is None or not len(ids):
        return None
    names = run.class_names
    t = s["table"]
    cls = _namer(names)
    caps = []
    for i, r in zip(ids, s["rows"]):
        label = cls(t["label"][r])
        if "clean label" in t and t["clean label"][r] != t["label"][r]:
            label += f" (true {cls(t['clean label'][r])})"
        fe = t["forgetting events"][r]
        caps.append(f"#{int(i)} {label}\n" + ("never learned" if np.isinf(fe) else f"forgotten {int(fe)}x")
                    + f", AUM {t['AUM'][r]:.2f}")
    flag = t["flipped label"][s["rows"]] if "flipped label" in t else None
    fig = montage(images, caps, ncols=6, title=s["title"], highlight=flag)
    return save_figure(fig, out_dir / f"{s['key']}_examples", ("png",))[0]


def _table_html(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _text_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def write_report(run_path, out_dir, *, figures=None, animations: bool = True, fps: int = 3,
                 max_frames: int = 30, top_k: int = 12, progress: bool = False) -> Path:
    """Render the report of the run at `run_path` into `out_dir`; returns the report.html path.
    `figures`: names to include (default: every figure the run has data for)."""
    run = run_path if isinstance(run_path, Run) else open_run(run_path)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    rendered, skipped = [], []
    for entry in available_figures(run):
        if (figures is not None and entry.name not in figures) or (entry.kind == "animation" and not animations):
            continue
        params = {"fps": fps, "max_frames": max_frames} if entry.kind == "animation" else {}
        try:
            if progress:
                print(f"report: rendering {entry.name}", file=sys.stderr)
            paths = render_figure(run, entry.name, fig_dir, ("png",), **params)
            rendered.append((entry, paths[0]))
        except Exception as e:  # noqa: BLE001 - one failing figure must not lose the report
            skipped.append((entry.name, f"{type(e).__name__}: {e}"))
    unavailable = sorted(set(FIGURES) - {e.name for e in available_figures(run)})
    numbers = key_numbers(run)
    detection = None
    if run.has("ground_truth", "is_mislabeled") and run.has("train", "logits"):
        det = analysis.mislabel_detection(run)
        detection = [[str(s), _fmt(float(v))] for s, v in zip(det["score"].values, det["auroc"].values)]
    sets = _example_sets(run, top_k) if run.has("train", "logits") else []
    tables = [(s, *_render_rows(run, s), _montage_png(run, s, fig_dir)) for s in sets]

    title = f"dynascope report: {run.path.name}"
    # -- summary.txt ------------------------------------------------------------------
    txt = [title, "=" * len(title), run.describe_progress(), "", "Key numbers"]
    txt += [f"  {k}: {_fmt(v)}" for k, v in numbers.items()]
    if detection:
        txt += ["", "Finding flipped labels (AUROC, 0.5 = chance)"] + [f"  {s}: {v}" for s, v in detection]
    for s, header, rows, _ in tables:
        txt += ["", s["title"], _text_table(header, rows)]
    txt += ["", "Figures: " + ", ".join(p.name for _, p in rendered)]
    if skipped:
        txt += ["Skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped)]
    (out / "summary.txt").write_text("\n".join(txt) + "\n")

    # -- report.html --------------------------------------------------------------------
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
         f"<p class='note'>{html.escape(run.describe_progress())}</p><h2>Key numbers</h2>",
         _table_html(["quantity", "value"], [[k, _fmt(v)] for k, v in numbers.items()])]
    if detection:
        h += ["<h2>Finding flipped labels</h2><p class='note'>AUROC of each score for the examples whose "
              "label was flipped (ground truth recorded with the run); 0.5 is chance.</p>",
              _table_html(["score", "AUROC"], detection)]
    for s, header, rows, png in tables:
        h.append(f"<h2>{html.escape(s['title'])}</h2>")
        if png is not None:
            h.append(f"<figure><img src='{png.relative_to(out).as_posix()}' alt='{s['key']}'></figure>")
        h.append(_table_html(header, rows))
    h.append("<h2>Figures</h2>")
    for entry, path in rendered:
        h.append(f"<figure><img src='{path.relative_to(out).as_posix()}' alt='{entry.name}'>"
                 f"<figcaption><b>{entry.name}</b>: {html.escape(entry.description)}</figcaption></figure>")
    if skipped or unavailable:
        h.append("<p class='note'>" + "".join(f"Skipped {html.escape(n)}: {html.escape(w)}<br>" for n, w in skipped)
                 + (f"Not available for this run (data not recorded): {html.escape(', '.join(unavailable))}"
                    if unavailable else "") + "</p>")
    h.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(h))
    return path
