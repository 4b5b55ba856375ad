"""Augmentation figures: a montage of one example's augmented views, each layer's
invariance ratio, and view-by-view correlation within chosen layers."""
from __future__ import annotations

import matplotlib
import matplotlib.patches  # noqa: F401 - the legend's patch
import matplotlib.pyplot as plt
import numpy as np

from dynascope.analysis import augmentation as A
from dynascope.analysis import features as F
from dynascope.analysis.run import Run

from .registry import register_figure
from .style import DIVERGING_CMAP, PALETTE, mark_blocks, figure_style

NEEDS = ("augmentation",)


FILL = "#CC79A7"   # Okabe-Ito reddish purple: pixels the augmentation filled in


def display_range(img: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    """Each image's own 1st-99th percentile over its real pixels (fill excluded), so one
    view's padding or contrast never washes out another's."""
    vals = img[:, keep] if keep.any() else img.reshape(img.shape[0], -1)
    lo, hi = np.percentile(vals, [1, 99])
    return float(lo), float(max(hi, lo + 1e-12))


def filled_pixels(view: np.ndarray, original: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pixels set to the transform's fill value in every channel (outside the transformed
    frame) where the original had real content."""
    return (view == fill).all(0) & ~(original == fill).all(0)


def smoothed(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of each channel (edges reflected): display only, to bring out
    structure under pixel noise; sigma <= 0 returns the image."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.pad(img, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, out)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 2, out)


def _show(ax, img, mask):
    lo, hi = display_range(img, ~mask)
    x = np.clip((img - lo) / (hi - lo), 0, 1).transpose(1, 2, 0)
    ax.imshow(x[..., 0] if x.shape[-1] == 1 else x, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if mask.any():
        over = np.zeros(mask.shape + (4,))
        over[mask] = matplotlib.colors.to_rgba(FILL, 0.85)
        ax.imshow(over, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)


@register_figure("augmentation_montage", needs=("augmentation/montage",))
def augmentation_montage(run: Run, max_views: int = 6, smooth: float = 1.0):
    """One example as fed to the model and its first augmented views (top row), each scaled to
    its own 1st-99th percentile, the pixels the transform filled in marked, and under each
    view its change from the input; the bottom row shows the same images Gaussian-smoothed
    (display only) so that structure under pixel noise, and how the transform moved it, shows."""
    g = run.group("augmentation")
    m = g["montage"]
    original, views = m.values[0], m.values[1:1 + max_views]   # (channel, y, x), normalised inputs
    masks = [filled_pixels(v, original) for v in views]
    change = [float(np.sqrt(np.mean((v - original) ** 2)) / max(original.std(), 1e-12)) for v in views]
    sid = m.attrs.get("sample_id", "?")
    kinds = [("as fed to the model", 0.0)] + ([(f"smoothed, σ = {smooth:g} px", smooth)] if smooth > 0 else [])
    with figure_style():
        cols = len(views) + 1
        fig, axes = plt.subplots(len(kinds), cols, figsize=(1.15 * cols + 0.6, 1.3 * len(kinds) + 0.9),
                                 squeeze=False)
        none = np.zeros(original.shape[1:], bool)
        for r, (label, sigma) in enumerate(kinds):
            for c, (img, mask) in enumerate([(original, none)] + list(zip(views, masks))):
                ax = axes[r, c]
                _show(ax, smoothed(img, sigma), mask)
                if r == 0:
                    ax.set_title(f"input #{sid}" if c == 0 else f"view {c}", fontsize=7.5, pad=2)
                if r == len(kinds) - 1 and c > 0:
                    ax.set_xlabel(f"Δ {change[c - 1]:.2f}", fontsize=7, labelpad=2)
            axes[r, 0].set_ylabel(label, fontsize=7)
            for spine in axes[r, 0].spines.values():
                spine.set_visible(True)
                spine.set_color(PALETTE[3])
                spine.set_linewidth(2)
        fig.legend(handles=[matplotlib.patches.Patch(color=FILL, label="filled in (outside the moved frame)")],
                   loc="outside lower right", frameon=False, fontsize=7)
        how = str(g.attrs.get("transforms", "")).split("(")[0]
        fig.suptitle(f"Example #{sid} and {len(views)} of its {g.attrs.get('n_aug', '?')} augmented views"
                     + (f" ({how})" if how else "")
                     + "\nΔ: RMS change from the input / the input's s.d. (√2 ≈ 1.41: as far as an unrelated image)",
                     fontsize=8)
    return fig


@register_figure("augmentation_invariance", needs=NEEDS)
def augmentation_invariance(run: Run, layers=None):
    """Within-augmentation feature variance relative to the across-sample variance, per layer."""
    res = A.augmentation_invariance(run, layers)
    names = list(res["layer"].values)
    x = np.arange(len(names))
    with figure_style():
        fig, ax = plt.subplots(figsize=(max(4.4, 0.8 * len(names) + 2.8), 2.8))
        ax.bar(x, res["ratio"].values, color=PALETTE[0], alpha=0.75, width=0.6, label="mean over examples")
        per = res["ratio_per_sample"].values
        jitter = np.linspace(-0.15, 0.15, per.shape[0]) if per.shape[0] > 1 else np.zeros(1)
        for s in range(per.shape[0]):
            ax.plot(x + jitter[s], per[s], "o", ms=3, color=PALETTE[1], mec="black", mew=0.3,
                    label="single example" if s == 0 else None)
        ax.axhline(1.0, color="0.4", lw=0.8, ls="--", label="as different as\nanother example")
        ax.set_xticks(x, names, rotation=30 if len(names) > 5 else 0)
        ax.set(xlabel="layer", ylabel="within-augmentation variance\n/ across-sample variance",
               title=f"Augmentation sensitivity ({res.attrs['n_aug']} views per example)")
        ax.set_ylim(0, max(1.1, float(np.nanmax(per)) * 1.1) if np.isfinite(per).any() else 1.1)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False,
                  title="0 = invariant", title_fontsize=7)
    return fig


@register_figure("augmentation_view_correlation", needs=NEEDS)
def augmentation_view_correlation(run: Run, layers=None, max_samples: int = 4, views_per_sample: int = 30):
    """Correlation between augmented views' activation vectors in chosen layers (default first
    and last): bright diagonal blocks mean a layer sees the views of one example as alike."""
    names = F.activation_layers(run, layers, group="augmentation")
    if layers is None:
        names = sorted({names[0], names[-1]}, key=names.index)
    with figure_style():
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 1.0, 3.1), squeeze=False)
        for ax, a in zip(axes[0], names):
            r = A.view_correlation(run, a, max_samples, views_per_sample)
            im = ax.imshow(r.values, cmap=DIVERGING_CMAP, vmin=-1, vmax=1, interpolation="nearest")
            ax.grid(False)
            sid = r["sample_id"].values
            centres, firsts = mark_blocks(ax, sid)
            labels = [f"#{s}" for s in sid[firsts]]
            ax.set_xticks(centres, labels, fontsize=7)
            ax.set_yticks(centres, labels, fontsize=7)
            ax.tick_params(length=0)
            ax.set(xlabel="augmented view (by example)", ylabel="augmented view (by example)",
                   title=F.display_name(a))
        fig.colorbar(im, ax=axes, shrink=0.85, label="Pearson r over units")
        fig.suptitle("Correlation between augmented views")
    return fig
