"""Example-dynamics figures: difficulty evolution, the train/test accuracy gap, the data map,
confidence evolution and loss-change highlighting.

Plain training curves and class-wise accuracy/loss lines are in `figures.curves`; these are
the views built on per-example statistics (analysis.forgetting, .difficulty, .cartography).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, TwoSlopeNorm

from dynascope import analysis
from dynascope.analysis.run import Run

from .registry import CLASS_LABELS, register_figure
from .style import DECREASE, DIVERGING_CMAP, INCREASE, PALETTE, TEST, TRAIN, class_color, integer_axis, figure_style

FORGET_CMAP = "Reds"  # single-hue: intensity reads the same under colour-vision deficiencies


def _class_names(run: Run, ids) -> list[str]:
    names = run.class_names
    return [names[int(c)] if int(c) < len(names) else str(c) for c in ids]


def _legend_right(fig, ax, title: str):
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, title=title, loc="outside right center")


def _forgetting_histogram(ax, f):
    counts = f["forgetting_events"].values
    never = f["never_learned"].values
    learned = counts[~never].astype(int)
    top = int(learned.max()) if learned.size else 0
    hist = np.bincount(learned, minlength=top + 1)
    ax.bar(np.arange(top + 1), hist, color=PALETTE[0], width=0.8, label="learned at least once")
    ax.bar([top + 1.5], [never.sum()], color=PALETTE[8], width=0.8, label="never learned")
    ticks = list(range(0, top + 1, max(1, (top + 1) // 8))) + [top + 1.5]
    ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + ["never"])
    ax.set(xlabel="forgetting events per example", ylabel="examples",
           title="Distribution of forgetting events")
    ax.legend()


def _forgetting_timeline(fig, ax, tl, max_rows: int = 300):
    ev = tl["forgetting_events"].values  # (epoch, example)
    cum = np.cumsum(ev, axis=0)
    total = cum[-1]
    first = np.where(total > 0, np.argmax(cum > 0, axis=0), len(cum))
    order = np.lexsort((first, -total))  # most forgotten first, then earliest forgotten
    ever = order[total[order] > 0]
    forgotten = ever[:max_rows]
    epochs = tl["epoch"].values
    if not len(forgotten):
        ax.text(0.5, 0.5, "no example was forgotten", ha="center", va="center", transform=ax.transAxes)
    else:
        top = int(total[forgotten].max())
        cmap = plt.get_cmap(FORGET_CMAP, top + 1)
        shades = np.linspace(0.3, 1, top) if top > 1 else np.array([0.75])
        cmap = ListedColormap(np.vstack([[1, 1, 1, 1], cmap(shades)]))
        norm = BoundaryNorm(np.arange(-0.5, top + 1.5), cmap.N)
        im = ax.imshow(cum[:, forgotten].T, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                       extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(forgotten) - 0.5, -0.5))
        bar = fig.colorbar(im, ax=ax, ticks=np.arange(0, top + 1, max(1, (top + 1) // 6)))
        bar.set_label("forgetting events so far")
    ax.grid(False)
    ax.set(xlabel="epoch", ylabel="example (most forgotten first)",
           title=f"Forgetting timeline ({len(ever)} of {ev.shape[1]} examples ever forgotten"
                 + (f", top {max_rows} shown)" if len(ever) > max_rows else ")"))
    integer_axis(ax)


@register_figure("difficulty_evolution", needs=("train/logits",))
def difficulty_evolution(run: Run, source: str = "train"):
    """Average and class-wise difficulty (1 - p(gold)) over training, the distribution of
    forgetting events and a colour-coded forgetting timeline."""
    d = analysis.difficulty(run, source=source)
    f = analysis.forgetting(run, source=source)
    tl = analysis.forgetting_timeline(run, source=source)
    x = d["epoch"].values
    with figure_style():
        fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.4))
        ax = axes[0, 0]
        q = np.nanquantile(d["difficulty"].values, [0.25, 0.5, 0.75], axis=1)
        ax.fill_between(x, q[0], q[2], color=TRAIN, alpha=0.2, lw=0, label="interquartile range")
        ax.plot(x, d["mean_difficulty"], "o-", color=TRAIN, ms=3, label="mean")
        ax.plot(x, q[1], "--", color=TRAIN, lw=1, label="median")
        ax.set(xlabel="epoch", ylabel="difficulty, 1 − p(gold label)", ylim=(0, 1),
               title="Average difficulty over training")
        integer_axis(ax)
        ax.legend()
        ax = axes[0, 1]
        for k, cid in enumerate(d["class_id"].values):
            ax.plot(x, d["class_difficulty"].sel(class_id=cid), "-", color=class_color(k), lw=1.3,
                    label=str(d["class_name"].values[k]))
        ax.set(xlabel="epoch", ylabel="difficulty, 1 − p(gold label)", ylim=(0, 1),
               title="Class-wise difficulty")
        integer_axis(ax)
        ax.legend(title="class", fontsize=7, ncols=2 if len(d["class_id"]) > 5 else 1)
        _forgetting_histogram(axes[1, 0], f)
        _forgetting_timeline(fig, axes[1, 1], tl)
        where = "training presentations" if source == "train" else "probe passes"
        fig.suptitle(f"Difficulty evolution ({where}, {d.sizes['example']} examples)")
    return fig


@register_figure("accuracy_evolution", needs=("probe/logits", "eval/logits"), tasks=CLASS_LABELS)
def accuracy_evolution(run: Run):
    """The generalisation gap on comparable quantities: probe-subset accuracy (training labels)
    and held-out accuracy of the same model after the same training step, the gap (probe minus
    held-out) per class over training, and per-class accuracies at the last such pass. With
    ground truth, a dashed line gives the probe accuracy on examples whose label was not flipped."""
    g = analysis.generalisation_gap(run)
    x = g["step"].values
    half = (np.diff(x).min() / 2) if len(x) > 1 else 0.5
    pr, te = 100 * g["probe_accuracy"].values, 100 * g["eval_accuracy"].values
    names = _class_names(run, g["class_id"].values)
    with figure_style():
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), width_ratios=[1, 1.15, 1.1])
        ax = axes[0]
        ax.plot(x, pr, "o-", color=TRAIN, ms=3, label="probe subset (training labels)")
        if "probe_clean_accuracy" in g:
            ax.plot(x, 100 * g["probe_clean_accuracy"].values, "--", color=TRAIN, lw=1,
                    label="probe subset, unflipped labels")
        ax.plot(x, te, "s-", color=TEST, ms=3, label="held-out")
        ax.fill_between(x, pr, te, where=pr >= te, interpolate=True, color=INCREASE, alpha=0.18, lw=0,
                        label="probe > held-out")
        ax.fill_between(x, pr, te, where=pr < te, interpolate=True, color=DECREASE, alpha=0.18, lw=0,
                        label="held-out > probe")
        ax.set(xlabel="training step", ylabel="accuracy (%)", ylim=(0, 100),
               title="Same model, same step")
        ax.legend(loc="lower right", fontsize=6)
        ax = axes[1]
        gap = 100 * g["class_gap"].transpose("class_id", "pass").values
        lim = max(5.0, float(np.nanmax(np.abs(gap))) if np.isfinite(gap).any() else 5.0)
        im = ax.imshow(gap, aspect="auto", cmap=DIVERGING_CMAP, norm=TwoSlopeNorm(0, -lim, lim),
                       interpolation="nearest", extent=(x[0] - half, x[-1] + half, len(names) - 0.5, -0.5))
        ax.set_yticks(np.arange(len(names)), names)
        ax.grid(False)
        ax.set(xlabel="training step", ylabel="class", title="Per-class gap (probe − held-out)")
        fig.colorbar(im, ax=ax).set_label("gap (percentage points)")
        ax = axes[2]
        pos = np.arange(len(names))
        ax.bar(pos - 0.2, 100 * g["probe_class_accuracy"].values[-1], 0.4, color=TRAIN, label="probe subset")
        ax.bar(pos + 0.2, 100 * g["eval_class_accuracy"].values[-1], 0.4, color=TEST, label="held-out")
        ax.set_xticks(pos, names, rotation=45, ha="right")
        ax.set(ylabel="accuracy (%)", ylim=(0, 105), title=f"Per class, step {int(g['step'].values[-1])}")
        ax.legend(loc="lower right", fontsize=6)
    return fig


@register_figure("data_map", needs=("train/logits",))
def data_map(run: Run, source: str = "train", max_points: int = 20000, seed: int = 0):
    """Dataset Cartography data map: variability vs confidence, coloured by correctness;
    flipped labels circled when the run has ground truth."""
    m = analysis.cartography(run, source=source)
    conf, var, corr = m["confidence"].values, m["variability"].values, m["correctness"].values
    keep = np.arange(len(conf))
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_points, replace=False))
    mis = None
    if run.has("ground_truth", "is_mislabeled"):
        mis = run.ground_truth["is_mislabeled"].values.astype(bool)[m["example"].values]
    with figure_style():
        fig, ax = plt.subplots(figsize=(5.4, 4.3))
        bins = np.linspace(0, 1, 6)
        cmap = plt.get_cmap("viridis", len(bins) - 1)
        sc = ax.scatter(var[keep], conf[keep], c=corr[keep], cmap=cmap, norm=BoundaryNorm(bins, cmap.N),
                        s=9, alpha=0.8, lw=0)
        if mis is not None and mis.any():
            sel = keep[mis[keep]]
            ax.scatter(var[sel], conf[sel], s=34, facecolors="none", edgecolors=PALETTE[3], lw=0.9,
                       label=f"flipped label ({int(mis.sum())})")
            ax.legend(loc="upper right")
        fig.colorbar(sc, ax=ax, ticks=bins).set_label("correctness (fraction of presentations)")
        ax.set(xlabel="variability (std of p(gold label))", ylabel="confidence (mean p(gold label))",
               ylim=(-0.02, 1.02), xlim=(-0.01, max(0.5, float(np.nanmax(var)) + 0.02)),
               title=f"Data map ({len(conf)} examples)")
        kw = dict(transform=ax.transAxes, fontsize=8, color="0.25", style="italic",
                  bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none", alpha=0.75))
        ax.text(0.02, 0.97, "easy to learn", va="top", **kw)
        ax.text(0.02, 0.03, "hard to learn", va="bottom", **kw)
        ax.text(0.98, 0.5, "ambiguous", ha="right", va="center", **kw)
    return fig


@register_figure("confidence_evolution", needs=("train/logits",))
def confidence_evolution(run: Run):
    """Distribution of per-example confidence p(gold label) over training (density and
    median), and mean confidence of clean vs flipped-label examples or per class."""
    source = "probe" if run.has("probe", "logits") and run.probe.sizes.get("probe", 0) > 1 else "train"
    d = analysis.difficulty(run, source=source)
    conf = 1 - d["difficulty"].values  # (time, example)
    time = d["step"].values if source == "probe" else d["epoch"].values
    xlabel = "training step" if source == "probe" else "epoch"
    bins = np.linspace(0, 1, 21)
    dens = np.stack([np.histogram(row[~np.isnan(row)], bins)[0] for row in conf], axis=1)
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.3))
        ax = axes[0]
        edges = np.concatenate([[time[0] - 0.5], (time[1:] + time[:-1]) / 2, [time[-1] + 0.5]]) \
            if len(time) > 1 else np.array([time[0] - 0.5, time[0] + 0.5])
        im = ax.pcolormesh(edges, bins, np.where(dens > 0, dens, np.nan), cmap="viridis",
                           norm=LogNorm(1, max(2, dens.max())))
        ax.plot(time, np.nanmedian(conf, axis=1), color="white", lw=1.5, label="median")
        ax.grid(False)
        ax.set(xlabel=xlabel, ylabel="confidence, p(gold label)", title="Confidence distribution")
        ax.legend(loc="lower right", facecolor="0.3", labelcolor="white")
        fig.colorbar(im, ax=ax).set_label("examples")
        ax = axes[1]
        if run.has("ground_truth", "is_mislabeled"):
            mis = run.ground_truth["is_mislabeled"].values.astype(bool)[d["example"].values]
            for mask, label, color in ((~mis, "clean label", TRAIN), (mis, "flipped label", INCREASE)):
                if mask.any():
                    q = np.nanquantile(conf[:, mask], [0.25, 0.5, 0.75], axis=1)
                    ax.fill_between(time, q[0], q[2], color=color, alpha=0.2, lw=0)
                    ax.plot(time, q[1], "-", color=color, label=f"{label} ({int(mask.sum())}), median & IQR")
            ax.set_title("Confidence: clean vs flipped labels")
        else:
            for k, cid in enumerate(d["class_id"].values):
                ax.plot(time, 1 - d["class_difficulty"].sel(class_id=cid), color=class_color(k),
                        label=str(d["class_name"].values[k]))
            ax.set_title("Mean confidence by class")
        ax.set(xlabel=xlabel, ylabel="confidence, p(gold label)", ylim=(0, 1))
        ax.legend(fontsize=7)
        where = "probe passes" if source == "probe" else "training presentations, epoch mean"
        fig.suptitle(f"Confidence evolution ({where})")
    return fig


@register_figure("loss_change_highlight", needs=("train",))
def loss_change_highlight(run: Run, source: str = "train"):
    """Loss changes between consecutive presentations: examples learning (loss down, green)
    vs forgetting (loss up, red) per epoch, and every example's net change."""
    ch = analysis.example_loss_change(run, source=source)
    tdim = "epoch" if source == "train" else "probe"
    t = ch[tdim].values
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2))
        ax = axes[0]
        ax.bar(t, ch["time_n_learning"], color=DECREASE, label="loss decreased (learning)")
        ax.bar(t, -ch["time_n_forgetting"].values, color=INCREASE, label="loss increased (forgetting)")
        ax.axhline(0, color="black", lw=0.8)
        up, down = float(ch["time_n_learning"].max()), float(ch["time_n_forgetting"].max())
        ax.set_ylim(-1.5 * max(down, 1), 1.1 * max(up, 1))
        ax.set(xlabel=tdim, ylabel="examples (up: learning, down: forgetting)",
               title="Loss changes since the previous presentation")
        integer_axis(ax)
        ax.legend(loc="lower center", ncols=2, fontsize=7)
        ax = axes[1]
        net = np.sort(ch["net_change"].values)
        colors = np.where(net < 0, DECREASE, INCREASE)
        ax.bar(np.arange(len(net)), net, width=1.0, color=colors, lw=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xlabel="examples, sorted by net change", ylabel="loss change, last − first presentation",
               title=f"Net loss change per example ({int((net > 0).sum())} increased)")
        ax.set_xlim(-0.5, len(net) - 0.5)
    return fig
