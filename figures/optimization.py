"""Optimization-insight figures (issue 7): near-zero gradient counts, released fraction,
sign-flip fraction, weight-difference norm, and the layer-wise gradient-sign heatmap.

Per-step values are drawn faint, their centred moving average (peaks stay in place) thick
and the per-epoch mean as markers; the x axis is the epoch, steps at fractional epochs.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LinearSegmentedColormap, ListedColormap

from dynascope import analysis
from dynascope.analysis.run import Run

from .registry import register_figure
from .smooth import centred_mean
from .style import DECREASE, INCREASE, PALETTE, TRAIN, figure_style

SIGN_CMAP = LinearSegmentedColormap.from_list("dynascope_sign", [INCREASE, "#FFFFFF", DECREASE])
SIGN_LEVELS = ListedColormap([INCREASE, "#FFFFFF", DECREASE], name="dynascope_sign_levels")


def _fractional_epoch(step_epoch: np.ndarray) -> np.ndarray:
    """Step positions in epochs: epoch e's k-th of n steps sits at e + k/n."""
    x = np.asarray(step_epoch, np.float64).copy()
    for e in np.unique(step_epoch):
        ix = np.flatnonzero(step_epoch == e)
        x[ix] = e + np.arange(len(ix)) / len(ix)
    return x


def _epoch_centres(gd) -> np.ndarray:
    return gd["epoch"].values + 0.5


def _series(ax, gd, var: str, color: str, label: str, scale: float = 1.0, ma: bool = True):
    x = _fractional_epoch(gd["step_epoch"].values)
    ax.plot(x, scale * gd[var].values, "-", color=color, lw=0.6, alpha=0.35)
    if ma and f"{var}_ma" in gd:
        ax.plot(x, scale * gd[f"{var}_ma"].values, "-", color=color, lw=1.6,
                label=f"{label}, centred mean ({min(gd.attrs['window'], gd.sizes['step'])} steps)")
    if f"epoch_{var}" in gd:
        ax.plot(_epoch_centres(gd), scale * gd[f"epoch_{var}"].values, "o", color=color, ms=3.5,
                mec="white", mew=0.5, label=f"{label}, epoch mean")
    ax.set_xlabel("epoch")


def _step_legend(ax):
    handles, labels = ax.get_legend_handles_labels()
    handles.insert(0, plt.Line2D([], [], color="0.5", lw=0.6, alpha=0.6))
    labels.insert(0, "per step")
    ax.legend(handles, labels, loc="best", frameon=False)


@register_figure("zero_gradients", needs=("params/grad_hist",))
def zero_gradients(run: Run, eps=(0.0, 1e-7, 1e-5, 1e-3)):
    """Share of gradient components below several thresholds (exact zeros included) per step and epoch."""
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        total = None
        for i, e in enumerate(eps):
            gd = analysis.gradient_dynamics(run, eps=e)
            total = gd.attrs["total_components"]
            label = "|g| = 0" if e == 0 else f"|g| < {fmt_threshold(e)}"
            color = PALETTE[i % len(PALETTE)]
            x = _fractional_epoch(gd["step_epoch"].values)
            ax.plot(x, 100 * gd["below_eps_fraction"].values, "-", color=color, lw=0.7, alpha=0.5)
            ax.plot(_epoch_centres(gd), 100 * gd["epoch_below_eps_fraction"].values, "o-", color=color,
                    ms=3.5, lw=1.2, mec="white", mew=0.5, label=label)
        ax.set(xlabel="epoch", ylabel="gradient components (%)", ylim=(0, None),
               title=f"Near-zero gradients ({total:,} components)")
        ax.legend(title="thin: per step; dots: epoch mean", loc="best", frameon=False,
                  title_fontsize=7)
    return fig


@register_figure("released_fraction", needs=("params/released",))
def released_fraction(run: Run, near_zero: float = 1e-5, window: int = 50):
    """Of the near-zero gradients at step t-1, the fraction released (|g| >= threshold) at t."""
    gd = analysis.gradient_dynamics(run, near_zero=near_zero, window=window)
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        _series(ax, gd, "released_fraction", TRAIN, "released")
        ax.set(ylabel="released fraction", ylim=(0, None),
               title=f"Near-zero gradients released (|g| < {fmt_threshold(near_zero)} at t−1, ≥ at t)")
        _step_legend(ax)
    return fig


@register_figure("sign_flip_fraction", needs=("params/sign_flips",))
def sign_flip_fraction(run: Run, window: int = 50):
    """Fraction of gradient components whose sign flipped since the previous step."""
    gd = analysis.gradient_dynamics(run, window=window)
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.2, 3.0))
        _series(ax, gd, "sign_flip_fraction", PALETTE[3], "sign flips")
        ax.set(ylabel="fraction of components", ylim=(0, None),
               title="Gradient sign flips between consecutive steps")
        _step_legend(ax)
    return fig


@register_figure("weight_diff_norm", needs=("params/weight_diff_norm",))
def weight_diff_norm(run: Run, window: int = 50, max_params: int = 8):
    """Norm of the weight change between consecutive steps: all parameters and per tensor."""
    gd = analysis.gradient_dynamics(run, window=window)
    x = _fractional_epoch(gd["step_epoch"].values)
    with figure_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.6, 3.0))
        _series(ax, gd, "weight_diff_norm", TRAIN, "‖Δw‖")
        ax.set(ylabel="‖w$_t$ − w$_{t−1}$‖ (L2, all parameters)", yscale="log",
               title="Weight change per step")
        _step_legend(ax)
        by = gd["weight_diff_norm_by_param"]
        order = np.argsort(-gd["param_size"].values)[:max_params]
        for i, j in enumerate(sorted(order)):
            raw = by.isel(param=j).values
            color = PALETTE[i % len(PALETTE)]
            bx.plot(x, raw, "-", lw=0.4, alpha=0.25, color=color)
            bx.plot(x, centred_mean(raw, window), "-", lw=1.2, color=color, label=str(gd["param"].values[j]))
        bx.set(xlabel="epoch", ylabel="‖Δw‖ per tensor (centred mean)", yscale="log",
               title="Per parameter tensor" + (f" (largest {max_params})" if len(gd["param"]) > max_params else ""))
        bx.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return fig


def fmt_threshold(e: float) -> str:
    """1e-07 -> 10^-7 (mathtext), 5e-06 -> 5×10^-6, 0 -> 0."""
    if e == 0:
        return "0"
    m, x = f"{e:.6e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"$10^{{{int(x)}}}$" if m == "1" else f"${m}\\times10^{{{int(x)}}}$"


def _layer_columns(sizes: np.ndarray, max_columns: int) -> np.ndarray:
    """Columns per tensor: proportional to its size, but every tensor gets a visible share
    (1/(2P) of the width, at most 6%); a small tensor's components then span several columns."""
    floor = max_columns * min(0.06, 0.5 / len(sizes))
    cols = np.maximum(sizes / sizes.sum() * max_columns, floor)
    return np.maximum(1, np.round(cols * max_columns / cols.sum())).astype(np.int64)


def _downsample(sign: np.ndarray, starts: np.ndarray, max_columns: int):
    """Mean sign per column, each tensor resampled on its own; returns image, column starts, widths."""
    n = sign.shape[1]
    sizes = np.diff(np.append(starts, n))
    cols = _layer_columns(sizes, max_columns)
    blocks = []
    for s0, size, c in zip(starts, sizes, cols):
        seg = sign[:, s0:s0 + size].astype(np.float32)
        if size >= c:   # several components per column: their mean sign
            edges = np.linspace(0, size, c + 1).round().astype(np.int64)
            blocks.append(np.add.reduceat(seg, edges[:-1], axis=1) / np.diff(edges))
        else:           # one component over several columns
            blocks.append(seg[:, np.arange(c) * size // c])
    return np.concatenate(blocks, axis=1), np.concatenate([[0], np.cumsum(cols)[:-1]]), cols


def _rows_axis(ax, signs):
    rows = signs.sizes["snapshot"]
    epochs, steps = signs["epoch"].values, signs["step"].values
    ticks = np.unique(np.linspace(0, rows - 1, min(rows, 8)).round().astype(int))
    ax.set_yticks(ticks, [f"{epochs[t]} (step {steps[t]})" for t in ticks])
    ax.set_ylabel("epoch (step) of snapshot")
    ax.grid(False)


@register_figure("gradient_sign_heatmap", needs=("snapshots",))
def gradient_sign_heatmap(run: Run, eps: float = 1e-5, max_columns: int = 1600, near_zero_only: bool = False):
    """Layer-wise gradient signs of the snapshotted tensors: green > 0, red < 0, white |g| ≤ eps.

    near_zero_only=True colours only the components with |g| ≤ eps (the earlier tool's view)."""
    signs = analysis.gradient_signs(run, eps=eps, near_zero_only=near_zero_only)
    starts, names = signs["param_start"].values, signs["param_name"].values
    img, col_starts, cols = _downsample(signs["sign"].values, starts, max_columns)
    ncol = img.shape[1]
    sizes = np.diff(np.append(starts, signs.sizes["index"]))
    with figure_style():
        fig, ax = plt.subplots(figsize=(8.0, 3.8))
        im = ax.imshow(img, aspect="auto", cmap=SIGN_CMAP, vmin=-1, vmax=1, interpolation="nearest")
        _rows_axis(ax, signs)
        for c0 in col_starts[1:]:
            ax.axvline(c0 - 0.5, color="black", lw=1.6)  # tensor boundary
        centres = col_starts + cols / 2 - 0.5
        show = cols >= 0.02 * ncol
        ax.set_xticks(centres[show], [f"{n} ({s:,})" for n, s in zip(names[show], sizes[show])],
                      fontsize=6.5, rotation=30, ha="right", rotation_mode="anchor")
        ax.tick_params(axis="x", length=0)
        ax.set_xlabel("parameter tensor (first to last layer) and its number of components")
        cb = fig.colorbar(im, ax=ax, ticks=[-1, 0, 1], fraction=0.04, pad=0.02)
        cb.ax.set_yticklabels(["all g < 0", "0", "all g > 0"])
        where = "|g| > " if near_zero_only else "|g| ≤ "
        cb.set_label(f"mean sign in a column (0 where {where}{fmt_threshold(eps)})", fontsize=7)
        per = int(np.ceil(sizes.max() / cols[np.argmax(sizes)]))
        ax.set_title(f"Layer-wise gradient signs ({sizes.sum():,} components; "
                     f"up to {per:,} per column; widths not to scale)")
    return fig


@register_figure("curvature_classes", needs=("params/secant_dot",))
def curvature_classes(run: Run, window: int = 50):
    """Minimum- vs maximum-like steps from the secant curvature, overall and per tensor by epoch."""
    gd = analysis.gradient_dynamics(run, window=window)
    cls = gd["curvature_class_by_param"].where(gd["curvature_by_param"].notnull())
    per_epoch = cls.assign_coords(step=gd["step_epoch"].values).groupby("step").mean()
    with figure_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(8.8, 3.2), width_ratios=(1, 1.15))
        _series(ax, gd, "minimum_like_fraction", TRAIN, "minimum-like", ma=False)
        ma = centred_mean(gd["minimum_like_fraction"].values, window)
        ax.plot(_fractional_epoch(gd["step_epoch"].values), ma, "-", color=TRAIN, lw=1.6,
                label=f"minimum-like, centred mean ({min(window, len(ma))} steps)")
        ax.set(ylabel="fraction of tensors with c$_t$ > 0", ylim=(0, 1.02),
               title="Minimum-like steps (secant curvature > 0)")
        _step_legend(ax)
        img = per_epoch.values.T                                  # (param, epoch)
        im = bx.imshow(img, aspect="auto", cmap=SIGN_CMAP, vmin=-1, vmax=1, interpolation="nearest")
        bx.grid(False)
        bx.set_yticks(np.arange(img.shape[0]), [str(n) for n in gd["param"].values], fontsize=7)
        ep = per_epoch["step"].values
        step = max(1, int(np.ceil(len(ep) / 12)))  # every epoch when it fits, else evenly spaced
        ticks = np.arange(0, len(ep), step)
        bx.set_xticks(ticks, [str(ep[t]) for t in ticks])
        bx.set(xlabel="epoch", ylabel="parameter tensor", title="Mean curvature class per epoch")
        cb = fig.colorbar(im, ax=bx, ticks=[-1, 0, 1], fraction=0.05, pad=0.02)
        cb.ax.set_yticklabels(["maximum-like", "mixed", "minimum-like"])
    return fig


@register_figure("dead_units", needs=("params/unit_zero",))
def dead_units(run: Run, window: int = 50):
    """Share of each tensor's output units whose gradient stayed exactly zero over a window."""
    gd = analysis.gradient_dynamics(run, window=window)
    by = gd["dead_units_by_param"].where(gd["dead_units_by_param"] >= 0)
    frac = by / gd["units"]
    x = _fractional_epoch(gd["step_epoch"].values)
    names, units = [str(n) for n in gd["param"].values], gd["units"].values
    groups: list[list[int]] = []          # tensors with identical curves (a layer's weight and bias)
    for j in range(gd.sizes["param"]):
        v = frac.isel(param=j).values
        for grp in groups:
            if units[grp[0]] == units[j] and np.array_equal(frac.isel(param=grp[0]).values, v, equal_nan=True):
                grp.append(j)
                break
        else:
            groups.append([j])
    quiet = [g for g in groups if not np.nanmax(np.append(frac.isel(param=g[0]).values, 0)) > 0]
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.6, 3.0))
        for i, grp in enumerate([g for g in groups if g not in quiet][:10]):
            ax.plot(x, 100 * frac.isel(param=grp[0]).values, "-", lw=1.3, color=PALETTE[i % len(PALETTE)],
                    label=f"{', '.join(names[j] for j in grp)} ({units[grp[0]]} units)")
        ax.plot(x, 100 * gd["dead_unit_fraction"].values, "k--", lw=1.2, label="all units")
        top = np.nanmax(np.append(100 * frac.values.ravel(), 1.0))
        ax.set(xlabel="epoch", ylabel="dead units (%)", ylim=(0, 1.45 * top), xlim=(0, x.max() + 0.05),
               title=f"Dead units (gradient exactly zero for {gd.attrs['dead_window']} steps)")
        if quiet:
            none = [names[j] for g in quiet for j in g]
            text = ", ".join(none[:6]) + (f" and {len(none) - 6} more" if len(none) > 6 else "")
            ax.plot([], [], color="none", label=f"no dead units: {text}")
        ax.legend(loc="upper left", frameon=False, fontsize=7)
    return fig
