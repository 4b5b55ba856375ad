"""The zoomed gradient-sign heatmap: single components over the snapshots, by default the
window where near-zero gradients cluster, with each tensor's span named above it."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from dynascope import analysis
from dynascope.analysis.run import Run

from .optimization import SIGN_LEVELS, _rows_axis, fmt_threshold
from .registry import register_figure
from .style import figure_style

NEAR_ZERO_BAR = "0.35"


def near_zero_window(marked: np.ndarray, width: int) -> int | None:
    """Start of the `width` consecutive columns holding the most marked entries over all rows
    (the first such window on ties); None when nothing is marked."""
    per_column = marked.sum(0)
    if width >= per_column.size:
        return 0 if per_column.any() else None
    cum = np.concatenate([[0], np.cumsum(per_column)])
    totals = cum[width:] - cum[:-width]
    return int(np.argmax(totals)) if totals.max() > 0 else None


def _default_start(sign, starts, n, width, marked) -> tuple[int, str]:
    start = near_zero_window(marked, width)
    if start is not None:
        return start, "window with the most"
    sizes = np.diff(np.append(starts, n))  # none near zero: the last tensor wide enough
    wide = np.flatnonzero(sizes >= width)
    return (int(starts[wide[-1]]) if wide.size else 0), "none"


def _name_tensors(top, starts, names, n, start, stop):
    """Boundaries in both panels' data coordinates and each tensor's name and span on top."""
    ends = np.append(starts[1:], n)
    ticks, labels = [], []
    for s0, s1, nm in zip(starts, ends, names):
        a, b = max(s0, start), min(s1, stop)
        if a >= b:
            continue
        ticks.append((a + b - 1) / 2)
        labels.append(f"{nm}\n[{a - s0:,}–{b - 1 - s0:,}] of {s1 - s0:,}" if b - a >= 0.12 * (stop - start)
                      else "")
    top.set_xticks(ticks, labels, fontsize=6.5)
    top.tick_params(axis="x", length=0, labeltop=True, labelbottom=False, pad=2)
    top.xaxis.set_label_position("top")
    top.set_xlabel("parameter tensor [its components shown] of its size", fontsize=7.5)


@register_figure("gradient_sign_heatmap_zoom", needs=("snapshots",))
def gradient_sign_heatmap_zoom(run: Run, eps: float = 1e-5, start: int | None = None, width: int = 300,
                               near_zero_only: bool = False):
    """Zoom on `width` consecutive gradient components, one column each: the sign at every
    snapshot (green > 0, red < 0, white |g| ≤ eps) under the share of snapshots in which each
    component was near zero. By default the window holding the most near-zero entries.

    near_zero_only=True colours only the components with |g| ≤ eps (white: larger)."""
    signs = analysis.gradient_signs(run, eps=eps, near_zero_only=near_zero_only)
    sign = signs["sign"].values
    n = signs.sizes["index"]
    starts, names = signs["param_start"].values, signs["param_name"].values
    width = int(max(1, min(width, n)))
    snap = run.group("snapshots")
    # near zero: |g| <= eps, whichever set the colours show
    g = np.concatenate([np.abs(np.asarray(snap[f"grad__{str(k).replace('.', '__')}"].values, np.float32))
                        .reshape(sign.shape[0], -1) for k in names], axis=1)
    near = g <= np.float32(eps)
    chosen = "given start"
    if start is None:
        start, chosen = _default_start(sign, starts, n, width, near)
    start = int(min(max(0, start), n - width))
    stop = start + width
    img, share = sign[:, start:stop], near[:, start:stop].mean(0)
    thr = fmt_threshold(eps)
    with figure_style():
        fig, (top, ax) = plt.subplots(2, 1, figsize=(8.0, 4.6), height_ratios=(1, 4),
                                      gridspec_kw={"hspace": 0.08})
        x = np.arange(start, stop)
        top.bar(x, share, width=1.0, color=NEAR_ZERO_BAR, linewidth=0)
        top.set(xlim=(start - 0.5, stop - 0.5), ylim=(0, 1))   # not sharex: each axis has its own ticks
        top.set_yticks([0, 1], ["0", "1"])
        top.set_ylabel(f"share of\nsnapshots\n|g| ≤ {thr}", fontsize=6.5)
        top.grid(False)
        im = ax.imshow(img, aspect="auto", cmap=SIGN_LEVELS, vmin=-1.5, vmax=1.5, interpolation="nearest",
                       extent=(start - 0.5, stop - 0.5, img.shape[0] - 0.5, -0.5))
        rows = img.shape[0]
        _rows_axis(ax, signs)
        if rows <= 16:  # every snapshot labelled when they fit
            ep, st = signs["epoch"].values, signs["step"].values
            ax.set_yticks(np.arange(rows), [f"{ep[t]} (step {st[t]})" for t in range(rows)], fontsize=7)
        for s0 in starts:
            if start < s0 < stop:
                for a in (top, ax):
                    a.axvline(s0 - 0.5, color="black", lw=1.4)   # tensor boundary
        _name_tensors(top, starts, names, n, start, stop)
        ax.set_xlabel("gradient component index (flattened over the snapshotted tensors)")
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        levels = [(img == v).mean() for v in (-1, 0, 1)]
        cb = fig.colorbar(im, ax=[top, ax], ticks=[-1, 0, 1], fraction=0.04, pad=0.02)
        small, large = f"|g| ≤ {thr}", f"|g| > {thr}"
        text = ([f"g < 0, {small}", large, f"g > 0, {small}"] if near_zero_only else ["g < 0", small, "g > 0"])
        share_text = [f"{p:.0%}" if p == 0 or p >= 0.005 else "<1%" for p in levels]   # never "0%" when some
        cb.ax.set_yticklabels([f"{t}\n({q} of cells)" for t, q in zip(text, share_text)], fontsize=7)
        cb.set_label("sign of each component at each snapshot", fontsize=7)
        why = {"window with the most": f"the {width}-component window with the most |g| ≤ {thr}",
               "none": f"no component reached |g| ≤ {thr}", "given start": "chosen start"}[chosen]
        top.set_title(f"Gradient signs of components {start:,}–{stop - 1:,} ({why})", fontsize=9, pad=4)
    return fig
