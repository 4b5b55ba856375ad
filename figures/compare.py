"""Figures over several runs: training and class curves, data maps, forgetting
distributions, opposing-pair counts and gradient statistics, overlaid or tiled.

Runs whose configuration differs only in the seed form one condition, drawn as the mean
over seeds with a band of ± one standard deviation (the caption says how many seeds).
Each figure is a function (runs: list[Run]) -> Figure in `COMPARISONS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np

from dynascope import analysis
from dynascope.analysis.registry import first_paragraph, run_has_all

from .style import PALETTE, class_color, integer_axis, figure_style

# configuration keys that never define a condition: where and how a run was stored or run
NOT_A_CONDITION = {"seed", "out", "overwrite", "device", "data_dir", "download", "chunk_steps"}


@dataclass(frozen=True)
class Comparison:
    name: str
    func: Callable
    needs: tuple[str, ...]
    description: str

    def available(self, runs) -> bool:
        return all(run_has_all(r, self.needs) for r in runs)


COMPARISONS: dict[str, Comparison] = {}


def register_comparison(name: str, needs: tuple[str, ...] = ()):
    def deco(func):
        COMPARISONS[name] = Comparison(name, func, tuple(needs), first_paragraph(func.__doc__))
        return func
    return deco


def conditions(runs) -> list[tuple[str, list]]:
    """Group runs by configuration without the seed: [(label, runs)], labelled by the
    settings that differ between groups (or the run names when nothing differs)."""
    def key(r):
        cfg = r.attrs.get("config", {})
        return tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in NOT_A_CONDITION))

    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    keys = list(groups)
    differing = sorted({k for kk in keys for k, _ in kk if len({dict(x).get(k) for x in keys}) > 1})
    out = []
    for kk in keys:
        d = dict(kk)
        label = ", ".join(f"{k}={d.get(k, '—')}" for k in differing) if differing else \
            ", ".join(r.path.stem if r.path.stem != "run" else r.path.parent.name for r in groups[kk])
        n = len(groups[kk])
        seeds = {repr(r.attrs.get("config", {}).get("seed")) for r in groups[kk]}
        what = "seeds" if len(seeds) == n else "runs"   # the same seed twice is a repeat, not a seed
        out.append((label + (f" ({n} {what})" if n > 1 else ""), groups[kk]))
    return out


def _band(ax, x, rows, color, label):
    """Mean line with a ± sd band over rows (seeds); rows may differ in length (cut to the shortest)."""
    n = min(len(r) for r in rows)
    m = np.array([np.asarray(r[:n], float) for r in rows])
    mean = np.nanmean(m, axis=0)
    ax.plot(x[:n], mean, "-", color=color, lw=1.4, label=label)
    if len(rows) > 1:
        sd = np.nanstd(m, axis=0, ddof=1)
        ax.fill_between(x[:n], mean - sd, mean + sd, color=color, alpha=0.2, lw=0)


def _label(r) -> str:
    return r.path.stem if r.path.stem != "run" else r.path.parent.name


@register_comparison("compare_training_curves", needs=("train",))
def compare_training_curves(runs):
    """Training loss and held-out (or probe) accuracy per epoch for each condition: mean over
    seeds, band ± one standard deviation."""
    with figure_style():
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(6.9, 2.6))
        for k, (label, rs) in enumerate(conditions(runs)):
            cs = [analysis.epoch_curves(r) for r in rs]
            x = cs[0]["epoch"].values
            _band(ax, x, [c["train_loss"].values for c in cs], PALETTE[k % len(PALETTE)], label)
            acc = "eval_accuracy" if all("eval_accuracy" in c for c in cs) else "probe_accuracy"
            if all(acc in c for c in cs):
                _band(bx, x, [100 * c[acc].values for c in cs], PALETTE[k % len(PALETTE)], label)
                bx.set(ylabel=f"{'held-out' if acc == 'eval_accuracy' else 'probe-subset'} accuracy (%)")
        ax.set(xlabel="epoch", ylabel="training loss (presentations)", title="Training loss")
        bx.set(xlabel="epoch", title="Accuracy")
        for a in (ax, bx):
            integer_axis(a)
        ax.legend(fontsize=6.5)
    return fig


@register_comparison("compare_class_curves", needs=("train/logits",))
def compare_class_curves(runs):
    """Held-out accuracy of each class per epoch (training accuracy when no held-out split was
    recorded), one panel per condition; lines are the mean over seeds."""
    conds = conditions(runs)
    with figure_style():
        fig, axes = plt.subplots(1, len(conds), figsize=(2.6 * len(conds) + 1.2, 2.6), sharey=True, squeeze=False)
        for ax, (label, rs) in zip(axes[0], conds):
            cs = [analysis.class_curves(r) for r in rs]
            var = "eval_accuracy" if all("eval_accuracy" in c for c in cs) else "train_accuracy"
            x = cs[0]["epoch"].values
            for j, cid in enumerate(cs[0]["class_id"].values):
                _band(ax, x, [100 * c[var].sel(class_id=cid).values for c in cs], class_color(j),
                      str(cs[0]["class_name"].values[j]))
            ax.set(xlabel="epoch", title=label, ylim=(0, 100))
            integer_axis(ax)
        axes[0, 0].set_ylabel(f"{'held-out' if var == 'eval_accuracy' else 'training'} accuracy (%)")
        h, lab = axes[0, 0].get_legend_handles_labels()
        fig.legend(h, lab, title="class", loc="outside right center", fontsize=6.5)
    return fig


@register_comparison("compare_data_maps", needs=("train/logits",))
def compare_data_maps(runs):
    """Data maps (Swayamdipta et al. 2020) side by side, one per run: mean confidence in the
    given label against its variability over epochs, coloured by correctness."""
    with figure_style():
        fig, axes = plt.subplots(1, len(runs), figsize=(2.5 * len(runs) + 0.8, 2.6), sharex=True, sharey=True,
                                 squeeze=False)
        for ax, r in zip(axes[0], runs):
            m = analysis.cartography(r)
            sc = ax.scatter(m["variability"], m["confidence"], c=m["correctness"], s=2, cmap="viridis",
                            vmin=0, vmax=1, rasterized=True, lw=0)
            ax.set(xlabel="variability", title=_label(r))
        axes[0, 0].set_ylabel("confidence")
        fig.colorbar(sc, ax=axes[0, -1], label="correctness")
    return fig


@register_comparison("compare_forgetting", needs=("train/logits",))
def compare_forgetting(runs):
    """Distribution of forgetting events per example for each condition (mean share over
    seeds). Never-learned examples are counted apart, in the legend, not as a number of events."""
    with figure_style():
        fig, ax = plt.subplots(figsize=(3.6, 2.6))
        conds = conditions(runs)
        fs = {label: [analysis.forgetting(r, never_learned="exclude") for r in rs] for label, rs in conds}
        top = max(int(np.nanmax(f["forgetting_events"].values, initial=0)) for v in fs.values() for f in v)
        edges = np.arange(top + 2) - 0.5
        for k, (label, rs) in enumerate(conds):
            hists, never = [], []
            for f in fs[label]:
                ev = f["forgetting_events"].values
                h, _ = np.histogram(ev[np.isfinite(ev)], bins=edges)
                hists.append(h / max(len(ev), 1))
                never.append(int(f["never_learned"].sum()))
            ax.stairs(100 * np.mean(hists, axis=0), edges, color=PALETTE[k % len(PALETTE)], lw=1.4,
                      label=f"{label}; never learned {np.mean(never):.0f}")
        ax.set(xlabel="forgetting events", ylabel="examples (%)", yscale="log", title="Forgetting events")
        integer_axis(ax)
        ax.legend(fontsize=6)
    return fig


@register_comparison("compare_opposing_pairs", needs=("probe/grad_proj",))
def compare_opposing_pairs(runs):
    """Number of opposing pairs at each probe pass for each condition: mean over seeds, band
    ± one standard deviation; thresholds as stated below the figure."""
    with figure_style():
        fig, ax = plt.subplots(figsize=(3.6, 2.6))
        for k, (label, rs) in enumerate(conditions(runs)):
            rr = [analysis.opposing_pairs(r) for r in rs]
            _band(ax, rr[0]["step"].values, [x["pair_count"].values for x in rr], PALETTE[k % len(PALETTE)], label)
        ax.set(xlabel="training step", ylabel="opposing pairs", title="Opposing pairs over training")
        ax.legend(fontsize=6.5)
    return fig


@register_comparison("compare_gradient_statistics", needs=("params/sign_flips", "params/grad_hist"))
def compare_gradient_statistics(runs):
    """Per-epoch gradient statistics for each condition: mean gradient norm, share of
    near-zero components and sign-flip fraction (mean over seeds, band ± one standard deviation)."""
    panels = (("epoch_grad_norm", "gradient norm", 1), ("epoch_below_eps_fraction", "near-zero components (%)", 100),
              ("epoch_sign_flip_fraction", "sign flips (%)", 100))
    with figure_style():
        fig, axes = plt.subplots(1, 3, figsize=(6.9, 2.4))
        for k, (label, rs) in enumerate(conditions(runs)):
            gs = [analysis.gradient_dynamics(r) for r in rs]
            x = gs[0]["epoch"].values
            for ax, (var, ylabel, scale) in zip(axes, panels):
                _band(ax, x, [scale * g[var].values for g in gs], PALETTE[k % len(PALETTE)], label)
                ax.set(xlabel="epoch", ylabel=ylabel)
                integer_axis(ax)
        axes[0].legend(fontsize=6)
    return fig
