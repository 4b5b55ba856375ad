"""Training-curve figures: loss/accuracy/learning rate, class-wise train/test curves and
per-example loss trajectories by class."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from dynascope import analysis
from dynascope.analysis.run import Run

from .registry import CLASS_LABELS, PER_TARGET, register_figure
from .style import TEST, TRAIN, class_color, integer_axis, figure_style

PROBE = "#009E73"


@register_figure("training_curves", needs=("train",))
def training_curves(run: Run):
    """Loss, accuracy and learning rate per epoch (train vs probe vs held-out)."""
    c = analysis.epoch_curves(run)
    epochs = c["epoch"].values
    has_acc = "train_accuracy" in c
    with figure_style():
        ncols = 3 if has_acc else 2
        fig, axes = plt.subplots(1, ncols, figsize=(3.2 * ncols, 2.6))
        ax = axes[0]
        ax.plot(epochs, c["train_loss"], "o-", color=TRAIN, label="train (presentations)", ms=3)
        for key, color, label in (("probe_loss", PROBE, "probe subset"), ("eval_loss", TEST, "held-out")):
            if key in c:
                ax.plot(epochs, c[key], "s--", color=color, label=label, ms=3)
        ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
        integer_axis(ax)
        ax.legend()
        if has_acc:
            ax = axes[1]
            ax.plot(epochs, 100 * c["train_accuracy"], "o-", color=TRAIN, label="train", ms=3)
            for key, color, label in (("probe_accuracy", PROBE, "probe subset"),
                                      ("eval_accuracy", TEST, "held-out")):
                if key in c:
                    ax.plot(epochs, 100 * c[key], "s--", color=color, label=label, ms=3)
            ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy", ylim=(0, 100))
            integer_axis(ax)
            ax.legend()
        ax = axes[-1]
        train = run.train
        steps = np.arange(train.sizes["step"])
        ax.plot(steps, train["lr"].values, color=TRAIN)
        ax.set(xlabel="training step", ylabel="learning rate", title="Learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


@register_figure("class_curves", needs=("train/logits",), tasks=CLASS_LABELS)
def class_curves(run: Run, columns: int = 5):
    """Accuracy of each class per epoch, one small panel per class: training presentations
    (solid) and held-out passes (dashed), so each class's train/held-out pair reads at a
    glance; the grey line in every panel is the all-class training accuracy."""
    c = analysis.class_curves(run)
    e = analysis.epoch_curves(run)
    has_eval = "eval_accuracy" in c
    epochs = c["epoch"].values
    k = c.sizes["class_id"]
    ncols = min(columns, k)
    nrows = int(np.ceil(k / ncols))
    with figure_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 * ncols + 0.4, 1.25 * nrows + 0.5),
                                 sharex=True, sharey=True, squeeze=False)
        for j, cid in enumerate(c["class_id"].values):
            ax = axes.flat[j]
            ax.plot(epochs, 100 * e["train_accuracy"].values, color="0.75", lw=0.8)
            ax.plot(epochs, 100 * c["train_accuracy"].sel(class_id=cid), "-", color=TRAIN, lw=1.2)
            if has_eval:
                ax.plot(epochs, 100 * c["eval_accuracy"].sel(class_id=cid), "--", color=TEST, lw=1.2)
            ax.set_title(str(c["class_name"].values[j]), fontsize=7, pad=2)
            ax.set_ylim(0, 100)
            integer_axis(ax)
        for ax in axes.flat[k:]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("accuracy (%)")
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        handles = [plt.Line2D([], [], color=TRAIN, lw=1.2, label="train (presentations)"),
                   plt.Line2D([], [], color="0.75", lw=0.8, label="train, all classes")]
        if has_eval:
            handles.insert(1, plt.Line2D([], [], color=TEST, lw=1.2, ls="--", label="held-out"))
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), frameon=False)
    return fig


@register_figure("loss_trajectories", needs=("train",), tasks=PER_TARGET)
def loss_trajectories(run: Run, per_class: int = 12, seed: int = 0):
    """Per-example loss over training, a panel per class (thin lines: examples; thick: mean)."""
    source = "probe" if run.has("probe") and run.probe.sizes.get("probe", 0) > 1 else "train"
    t = analysis.loss_trajectories(run, source=source)
    x = t["step"].values if source == "probe" else t["epoch"].values
    xlabel = "training step" if source == "probe" else "epoch"
    classes = np.unique(t["target"].values)
    names = run.class_names
    ncols = min(5, len(classes))
    nrows = int(np.ceil(len(classes) / ncols))
    rng = np.random.default_rng(seed)
    with figure_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 1.9 * nrows + 0.4),
                                 sharex=True, sharey=True, squeeze=False)
        loss = t["loss"].values
        for k, cls in enumerate(classes):
            ax = axes.flat[k]
            members = np.flatnonzero(t["target"].values == cls)
            shown = rng.choice(members, size=min(per_class, len(members)), replace=False)
            for m in shown:
                ax.plot(x, loss[:, m], color=class_color(int(cls)), alpha=0.35, lw=0.8)
            ax.plot(x, np.nanmean(loss[:, members], axis=1), color="black", lw=1.6, label="class mean")
            ax.set_title(names[int(cls)] if int(cls) < len(names) else str(cls))
            if k % ncols == 0:
                ax.set_ylabel("loss")
            if k >= (nrows - 1) * ncols:
                ax.set_xlabel(xlabel)
        for ax in axes.flat[len(classes):]:
            ax.set_visible(False)
        axes.flat[0].legend(loc="upper right")
        src = "probe passes" if source == "probe" else "training presentations (epoch mean)"
        fig.suptitle(f"Per-example loss trajectories by class ({src})")
    return fig
