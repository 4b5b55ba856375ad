"""Augmentation figures: a montage of one example's augmented views, each layer's
invariance ratio, and view-by-view correlation within chosen layers."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from dynascope.analysis import augmentation as A
from dynascope.analysis import features as F
from dynascope.analysis.run import Run

from .registry import register_figure
from .style import DIVERGING_CMAP, PALETTE, mark_blocks, figure_style

NEEDS = ("augmentation",)


@register_figure("augmentation_montage", needs=("augmentation/montage",))
def augmentation_montage(run: Run, max_views: int = 48, columns: int = 12):
    """The un-augmented input (outlined) and its first augmented views, as fed to the model."""
    m = run.group("augmentation")["montage"]
    views = m.values[:max_views]                     # (view, channel, y, x), normalised inputs
    lo, hi = np.percentile(views, [0.5, 99.5])       # one display range for every view
    views = np.clip((views - lo) / max(hi - lo, 1e-12), 0, 1)
    cols = min(columns, len(views))
    rows = int(np.ceil(len(views) / cols))
    sid = m.attrs.get("sample_id", "?")
    with figure_style():
        fig, axes = plt.subplots(rows, cols, figsize=(0.62 * cols + 0.2, 0.62 * rows + 0.5), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if k >= len(views):
                continue
            img = views[k].transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            if k == 0:
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_color(PALETTE[3])
                    spine.set_linewidth(2)
        n_aug = run.group("augmentation").attrs.get("n_aug", "?")
        fig.suptitle(f"Example {sid}: original (outlined) and {len(views) - 1} of {n_aug} augmented views",
                     fontsize=9)
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
