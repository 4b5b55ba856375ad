"""Training-curve figures: loss/accuracy/learning rate, class-wise train/test curves and
per-example loss trajectories by class."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

import analysis
from analysis.run import Run

from .registry import register_figure
from .style import TEST, TRAIN, class_color, integer_axis, style

PROBE = "#009E73"


@register_figure("training_curves", needs=("train",))
def training_curves(run: Run):
    """Loss, accuracy and learning rate per epoch (train vs probe vs held-out)."""
    c = analysis.epoch_curves(run)
    epochs = c["epoch"].values
    has_acc = "train_accuracy" in c
    with style():
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


def _class_panel(ax, c, var: str, ylabel: str, scale: float = 1.0):
    epochs = c["epoch"].values
    for k, cid in enumerate(c["class_id"].values):
        ax.plot(epochs, scale * c[var].sel(class_id=cid), "-", color=class_color(k), lw=1.2,
                label=str(c["class_name"].values[k]))
    ax.set(xlabel="epoch", ylabel=ylabel)
    integer_axis(ax)


@register_figure("class_curves", needs=("train/logits",))
def class_curves(run: Run):
    """Class-wise accuracy and loss per epoch, train and held-out side by side (wide format)."""
    c = analysis.class_curves(run)
    has_eval = "eval_accuracy" in c
    with style():
        cols = 4 if has_eval else 2
        fig, axes = plt.subplots(1, cols, figsize=(2.9 * cols + 1.2, 2.7), sharex=True)
        _class_panel(axes[0], c, "train_accuracy", "accuracy (%)", 100)
        axes[0].set_title("Train accuracy by class")
        _class_panel(axes[1], c, "train_loss", "loss")
        axes[1].set_title("Train loss by class")
        if has_eval:
            _class_panel(axes[2], c, "eval_accuracy", "accuracy (%)", 100)
            axes[2].set_title("Held-out accuracy by class")
            _class_panel(axes[3], c, "eval_loss", "loss")
            axes[3].set_title("Held-out loss by class")
        for ax in axes[::2]:
            ax.set_ylim(0, 100)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, title="class", loc="outside right center")
    return fig


@register_figure("loss_trajectories", needs=("train",))
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
    with style():
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
