"""The run report: report.html and summary.txt, in sections a reader goes through in order
(run, training, opposing signals, example dynamics, features, optimisation), each with its
findings first, then its figures (PNG by relative path, captions in full).

    write_report("run.zarr", "out/")   # -> out/report.html, out/summary.txt, out/figures/
                                        #    (CLI: dynascope report run.zarr --out out)

Numbers and figures come from the same resolved analyses (`analysis.parameters`): saved
results when they match, --param overrides when given, so report and figures agree.
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dynascope import analysis
from dynascope.analysis.run import Run, open_run

from .montage import example_images, montage
from .registry import FIGURES, available_figures
from .render import render_figure
from .style import save_figure

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:0 auto 2em;padding:0 1em;color:#222}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.5em 0;z-index:1}
nav a{margin-right:1.1em;text-decoration:none;color:#0072B2}section{scroll-margin-top:3em}
ul.findings li{margin:.3em 0}table.kv td{text-align:left}details summary{cursor:pointer;color:#0072B2;margin:.4em 0}
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
    out["last-epoch training loss over its presentations"] = float(last["train_loss"])
    if "train_accuracy" in last:
        out["last-epoch training accuracy over its presentations (%)"] = 100 * float(last["train_accuracy"])
    if "eval_accuracy" in last:
        out["final held-out accuracy (%)"] = 100 * float(last["eval_accuracy"])
    if run.has("probe", "logits") and run.has("eval", "logits"):
        try:
            g = analysis.generalisation_gap(run)
            out["generalisation gap at the last matched pass, probe − held-out (pp)"] = 100 * float(g["gap"][-1])
        except ValueError:
            pass
    if run.has("train", "logits"):
        f = analysis.forgetting(run)
        never = f["never_learned"].values.astype(bool)
        ev = f["forgetting_events"].values
        out["examples presented"] = int(f.sizes["example"])
        out["unforgettable examples"] = int(f["unforgettable"].sum())
        out["never-learned examples"] = int(never.sum())
        out["mean forgetting events per learned example (never-learned excluded)"] = \
            float(np.mean(ev[~never])) if (~never).any() else float("nan")
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


def _table_html(header, rows, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls!r}' if cls else ''}><tr>{head}</tr>{body}</table>"


def _text_table(header, rows) -> str:
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


# section id -> title; figures go to the section of their module unless listed in FIGURE_SECTION
SECTIONS = {"run": "Run", "training": "Training", "opposing": "Opposing signals",
            "dynamics": "Example dynamics", "features": "Features", "optimisation": "Optimisation"}
MODULE_SECTION = {"dynascope.figures.curves": "training", "dynascope.figures.dynamics": "dynamics", "dynascope.figures.opposing": "opposing",
                  "dynascope.figures.features": "features", "dynascope.figures.augmentation": "features",
                  "dynascope.figures.optimization": "optimisation", "dynascope.figures.sign_zoom": "optimisation",
                  "dynascope.figures.animations": "dynamics"}
FIGURE_SECTION = {"accuracy_evolution": "training", "training_animation": "training"}
# findings (registered one-line summaries) shown at the top of each section
FINDINGS = {"training": ("generalisation_gap",), "opposing": ("opposing_pairs", "opposing_groups",
                                                              "majority_opposition", "opposing_detection"),
            "dynamics": ("forgetting", "mislabel_detection")}


IDENTITY = ("run path", "run id", "status", "recorded", "dataset", "model", "epochs", "batch_size", "optimizer",
            "lr", "schedule", "seed", "recorded with", "report drawn with")


def section_of(entry) -> str:
    return FIGURE_SECTION.get(entry.name) or MODULE_SECTION.get(entry.func.__module__, "dynamics")


def config_rows(run: Run) -> list[list[str]]:
    """The run's configuration as (setting, value) rows: identity, data, model, training."""
    from .provenance import git_commit, run_id

    a = run.attrs
    rows = [["run path", str(run.path)], ["run id", run_id(run)], ["status", run.describe_progress()],
            ["recorded", f"{a.get('created', '?')} → {a.get('finished') or '(not finished)'}"],
            ["dataset", f"{run.dataset.get('name')} ({run.dataset.get('num_examples')} examples, "
                        f"{run.num_classes} classes)"],
            ["model", f"{a.get('model', {}).get('name')} ({a.get('model', {}).get('num_parameters', 0):,} parameters)"]]
    rows += [[k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)] for k, v in a.get("config", {}).items()
             if k not in ("dataset", "model")]
    versions = a.get("versions", {})
    rows.append(["recorded with", ", ".join(f"{k} {v}" for k, v in versions.items())])
    rows.append(["report drawn with", f"git {git_commit() or 'unknown (not a git checkout)'}"])
    return rows


def findings(run: Run, names) -> list[str]:
    """The registered one-line summary of each analysis the run has data for."""
    lines = []
    for name in names:
        entry = analysis.ANALYSES.get(name)
        if entry is None or not entry.available(run) or entry.summary is None:
            continue
        try:
            lines.append(f"{name}: {entry.summary(entry.func(run))}")
        except Exception as e:  # noqa: BLE001 - a finding that cannot be computed is said so
            lines.append(f"{name}: not computed ({type(e).__name__}: {str(e).splitlines()[0]})")
    return lines


def _scores(run: Run) -> tuple[list[list[str]] | None, list[list[str]] | None]:
    """Detectors scored against the ground truth kept in the store: AUROC of each mislabel
    score, and precision/recall of the opposing groups for the planted feature."""
    det = grp = None
    if run.has("ground_truth", "is_mislabeled") and run.has("train", "logits"):
        d = analysis.mislabel_detection(run)
        det = [[str(s), _fmt(float(v))] for s, v in zip(d["score"].values, d["auroc"].values)]
    if analysis.ANALYSES["opposing_detection"].available(run):
        from dynascope.analysis.scoring import score_opposing_groups

        r = score_opposing_groups(run, analysis.opposing_groups(run))
        grp = [["precision", _fmt(float(r["precision"]))], ["recall", _fmt(float(r["recall"]))],
               ["examples in opposing groups", str(int(r["detected"]))],
               ["of which carry the planted feature", str(int(r["true_positives"]))],
               ["tracked examples with the planted feature", str(int(r["planted"]))],
               ["tracked (probe) examples", str(int(r["tracked"]))]]
    return det, grp


def _img(path: Path, out: Path, alt: str, caption: str) -> str:
    return (f"<figure><img src='{html.escape(path.relative_to(out).as_posix())}' alt='{html.escape(alt)}'>"
            f"<figcaption><b>{html.escape(alt)}</b>: {html.escape(caption)}</figcaption></figure>")


def write_report(run_path, out_dir, *, figures=None, animations: bool = True, fps: int = 3,
                 max_frames: int = 30, top_k: int = 12, progress: bool = False,
                 params: dict | None = None) -> Path:
    """Render the report of the run at `run_path` into `out_dir`; returns the report.html path.
    figures: names to include (default: every figure the run has data for); params:
    {analysis or figure: {key: value}} as for `dynascope figures --param`."""
    from dynascope.analysis import parameters as P

    from .render import split_params

    run = run_path if isinstance(run_path, Run) else open_run(run_path)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ana, figp = split_params(params or {})
    entries = [e for e in available_figures(run)
               if (figures is None or e.name in figures) and (animations or e.kind != "animation")]
    rendered, skipped = {k: [] for k in SECTIONS}, []
    for entry in tqdm(entries, desc="report", unit="fig", disable=not progress, file=sys.stderr):
        kw = {"fps": fps, "max_frames": max_frames} if entry.kind == "animation" else {}
        try:
            paths = render_figure(run, entry.name, fig_dir, ("png",), params=ana, **{**kw, **figp.get(entry.name, {})})
            rendered[section_of(entry)].append((entry, paths[0]))
        except Exception as e:  # noqa: BLE001 - one failing figure must not lose the report
            skipped.append((entry.name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    unavailable = sorted(set(FIGURES) - {e.name for e in available_figures(run)})
    with P.use(ana):
        numbers = key_numbers(run)
        found = {k: findings(run, names) for k, names in FINDINGS.items()}
        detection, groups = _scores(run)
        sets = _example_sets(run, top_k) if run.has("train", "logits") else []
    tables = [(s, *_render_rows(run, s), _montage_png(run, s, fig_dir)) for s in sets]
    config = config_rows(run)

    title = f"dynascope report: {run.path.name}"
    # -- summary.txt ------------------------------------------------------------------
    txt = [title, "=" * len(title), run.describe_progress(), "", "Configuration"]
    txt += [f"  {k}: {v}" for k, v in config]
    txt += ["", "Key numbers"] + [f"  {k}: {_fmt(v)}" for k, v in numbers.items()]
    for key, lines in found.items():
        if lines:
            txt += ["", f"Findings: {SECTIONS[key]}"] + [f"  {line}" for line in lines]
    if groups:
        txt += ["", "Opposing groups vs the planted feature (ground truth)"] + [f"  {k}: {v}" for k, v in groups]
    if detection:
        txt += ["", "Finding flipped labels (AUROC, 0.5 = chance)"] + [f"  {s}: {v}" for s, v in detection]
    for s, header, rows, _ in tables:
        txt += ["", s["title"], _text_table(header, rows)]
    txt += ["", "Figures: " + ", ".join(p.name for v in rendered.values() for _, p in v)]
    if skipped:
        txt += ["Failed: " + "; ".join(f"{n} ({why})" for n, why in skipped)]
    (out / "summary.txt").write_text("\n".join(txt) + "\n")

    # -- report.html --------------------------------------------------------------------
    nav = "".join(f"<a href='#{k}'>{v}</a>" for k, v in SECTIONS.items())
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body><nav>{nav}</nav><h1>{html.escape(title)}</h1>"]

    def section(key, body):
        h.append(f"<section id='{key}'><h2>{SECTIONS[key]}</h2>")
        if found.get(key):
            h.append("<ul class='findings'>" + "".join(f"<li>{html.escape(x)}</li>" for x in found[key]) + "</ul>")
        h.extend(body)
        h.extend(_img(p, out, e.name, e.description) for e, p in rendered[key])
        h.append("</section>")

    ident = [r for r in config if r[0] in IDENTITY]
    settings = [r for r in config if r[0] not in IDENTITY]
    section("run", ["<h3>Configuration</h3>", _table_html(["setting", "value"], ident, "kv"),
                    f"<details><summary>all {len(settings)} training settings</summary>",
                    _table_html(["setting", "value"], settings, "kv"), "</details>",
                    "<h3>Key numbers</h3>", _table_html(["quantity", "value"], [[k, _fmt(v)] for k, v in numbers.items()])])
    section("training", ["<p class='note'>Generalisation gap: accuracy of the probe subset (scored against the "
                         "labels it is trained with) minus held-out accuracy, for the same model after the same "
                         "training step.</p>"])
    opp = []
    if groups:
        opp += ["<h3>Opposing groups against the planted feature</h3><p class='note'>Ground truth recorded with "
                "the run: precision is the share of examples placed in an opposing group that carry the planted "
                "feature; recall the share of tracked planted examples that were placed in one.</p>",
                _table_html(["score", "value"], groups)]
    section("opposing", opp)
    dyn = []
    if detection:
        dyn += ["<h3>Finding flipped labels</h3><p class='note'>AUROC of each score for the examples whose label "
                "was flipped (ground truth recorded with the run); 0.5 is chance.</p>",
                _table_html(["score", "AUROC"], detection)]
    for s, header, rows, png in tables:
        dyn.append(f"<h3>{html.escape(s['title'])}</h3>")
        if png is not None:
            dyn.append(f"<figure><img src='{png.relative_to(out).as_posix()}' alt='{s['key']}'></figure>")
        dyn.append(_table_html(header, rows))
    section("dynamics", dyn)
    section("features", [] if rendered["features"] else ["<p class='note'>No activations were recorded.</p>"])
    section("optimisation", [] if rendered["optimisation"] else
            ["<p class='note'>No parameter statistics were recorded.</p>"])
    if skipped or unavailable:
        h.append("<p class='note'>" + "".join(f"Failed {html.escape(n)}: {html.escape(w)}<br>" for n, w in skipped)
                 + (f"Not available for this run (data not recorded): {html.escape(', '.join(unavailable))}"
                    if unavailable else "") + "</p>")
    h.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(h))
    return path
