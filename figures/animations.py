"""GIF animations of training (matplotlib.animation.PillowWriter).

Animation entries in the figure registry are called as ``func(run, path, fps=..., max_frames=...)``
and write the GIF at `path` themselves. `fps` is the frame rate; `max_frames` caps the number
of frames by sampling the time axis evenly (the first and last frames are always kept).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.animation import FuncAnimation, PillowWriter

from dynascope import analysis
from dynascope.analysis.run import Run

from .registry import PER_TARGET, register_figure
from .style import DECREASE, INCREASE, TEST, TRAIN, class_color, integer_axis, figure_style

GIF_DPI = 90


def sample_frames(n: int, max_frames: int | None) -> np.ndarray:
    """Indices of at most `max_frames` of `n` frames, evenly spread, first and last included."""
    if n <= 0:
        raise ValueError("nothing to animate: the run has no recorded epochs/probes")
    if max_frames is None or max_frames >= n:
        return np.arange(n)
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if max_frames == 1:
        return np.array([n - 1])
    return np.unique(np.round(np.linspace(0, n - 1, max_frames)).astype(int))


def _save(fig, update, frames, path, fps: int) -> Path:
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    anim = FuncAnimation(fig, update, frames=list(frames), blit=False, repeat=False)
    anim.save(path, writer=PillowWriter(fps=fps), dpi=GIF_DPI)
    plt.close(fig)
    return path


def _opposing_counts(run: Run, epochs: np.ndarray) -> np.ndarray | None:
    """Opposing pairs per epoch (last probe of each epoch), when the run has projections and
    the opposing-signals analysis is installed; None otherwise."""
    fn = getattr(analysis, "opposing_pairs", None)
    if fn is None or not run.has("probe", "grad_proj"):
        return None
    try:
        pairs = fn(run, source="probe")
        count = pairs["pair_count"].values
        ep = pairs["epoch"].values
    except Exception:  # noqa: BLE001 - optional panel: never fail the animation for it
        return None
    out = np.full(len(epochs), np.nan)
    for i, e in enumerate(epochs):
        hit = np.flatnonzero(ep == e)
        if len(hit):
            out[i] = count[hit[-1]]
    return out


@register_figure("training_animation", needs=("train/logits",), kind="animation")
def training_animation(run: Run, path, fps: int = 3, max_frames: int | None = 60):
    """Per-epoch bars of train/held-out and class-wise accuracy, a training timeline marking
    the current epoch, and a statistics panel (loss, accuracy, forgetting events so far,
    opposing pairs when recorded)."""
    e = analysis.epoch_curves(run)
    c = analysis.class_curves(run)
    tl = analysis.forgetting_timeline(run)
    first = analysis.forgetting(run)["first_learned_epoch"].values
    epochs = e["epoch"].values
    forgot = np.cumsum(tl["forgetting_events"].sum("example").reindex(epoch=epochs, fill_value=0).values)
    has_eval = "eval_accuracy" in e
    tr = 100 * e["train_accuracy"].values
    te = 100 * e["eval_accuracy"].values if has_eval else None
    ctr = 100 * c["train_accuracy"].transpose("epoch", "class_id").values
    cte = 100 * c["eval_accuracy"].transpose("epoch", "class_id").values if "eval_accuracy" in c else None
    names = list(c["class_name"].values)
    pairs = _opposing_counts(run, epochs)
    frames = sample_frames(len(epochs), max_frames)
    with figure_style():
        fig, axes = plt.subplots(2, 2, figsize=(9, 6), width_ratios=[1, 1.6], layout="constrained")
        (ax_bar, ax_cls), (ax_stats, ax_time) = axes

        def update(i):
            for ax in axes.flat:
                ax.cla()
            ep = int(epochs[i])
            vals = [tr[i]] + ([te[i]] if has_eval else [])
            bars = ax_bar.bar(["train", "held-out"][:len(vals)], vals, color=[TRAIN, TEST][:len(vals)])
            ax_bar.bar_label(bars, fmt="%.1f%%", fontsize=8)
            ax_bar.set(ylim=(0, 105), ylabel="accuracy (%)", title=f"Accuracy, epoch {ep}")
            pos = np.arange(len(names))
            w = 0.4 if cte is not None else 0.8
            ax_cls.bar(pos - (w / 2 if cte is not None else 0), ctr[i], w, color=TRAIN, label="train")
            if cte is not None:
                ax_cls.bar(pos + w / 2, cte[i], w, color=TEST, label="held-out")
            ax_cls.set_xticks(pos, names, rotation=45, ha="right", fontsize=7)
            ax_cls.set(ylim=(0, 122), yticks=range(0, 101, 20), ylabel="accuracy (%)", title="Class-wise accuracy")
            ax_cls.legend(loc="upper center", fontsize=7, ncols=2)
            ax_time.plot(epochs, tr, "-", color=TRAIN, alpha=0.25)
            ax_time.plot(epochs[:i + 1], tr[:i + 1], "o-", color=TRAIN, ms=3, label="train")
            if has_eval:
                ax_time.plot(epochs, te, "-", color=TEST, alpha=0.25)
                ax_time.plot(epochs[:i + 1], te[:i + 1], "s-", color=TEST, ms=3, label="held-out")
            ax_time.axvline(ep, color="black", lw=1, ls="--")
            ax_time.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), xlim=(epochs[0] - 0.3, epochs[-1] + 0.3),
                        title="Training timeline")
            integer_axis(ax_time)
            ax_time.legend(loc="lower right", fontsize=7)
            lines = [f"epoch           {ep} / {int(epochs[-1])}",
                     f"train loss      {float(e['train_loss'].values[i]):.3f}",
                     f"train accuracy  {tr[i]:.1f}%"]
            if has_eval:
                lines += [f"held-out acc.   {te[i]:.1f}%", f"gap             {tr[i] - te[i]:+.1f} pp"]
            lines += [f"forgetting events so far  {int(forgot[i])}",
                      f"examples learned so far   {int(np.sum(first <= ep))} / {len(first)}"]
            if pairs is not None and np.isfinite(pairs[i]):
                lines.append(f"opposing pairs  {int(pairs[i])}")
            ax_stats.axis("off")
            ax_stats.set_title("Statistics")
            ax_stats.text(0.02, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=8.5,
                          transform=ax_stats.transAxes)
            return []

        return _save(fig, update, frames, path, fps)


@register_figure("loss_trajectories_animation", needs=("train",), kind="animation", tasks=PER_TARGET)
def loss_trajectories_animation(run: Run, path, fps: int = 5, max_frames: int | None = 60,
                                per_class: int = 3, seed: int = 0):
    """Per-example loss trajectories drawn over time, coloured by class (a few examples per class
    so each stays traceable), with the mean over all tracked examples in black; the current point
    is green where the loss fell since the previous frame (learning) and red where it rose."""
    source = "probe" if run.has("probe") and run.probe.sizes.get("probe", 0) > 1 else "train"
    t = analysis.loss_trajectories(run, source=source)
    x = t["step"].values if source == "probe" else t["epoch"].values
    xlabel = "training step" if source == "probe" else "epoch"
    loss = t["loss"].values  # (time, example)
    target = t["target"].values
    rng = np.random.default_rng(seed)
    shown = np.concatenate([rng.choice(np.flatnonzero(target == k), min(per_class, int((target == k).sum())),
                                       replace=False) for k in np.unique(target)])
    names = run.class_names
    frames = sample_frames(len(x), max_frames)
    top = float(np.nanmax(loss[:, shown])) * 1.05
    with figure_style():
        fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
        lines = [ax.plot([], [], color=class_color(int(target[m])), lw=1.1, alpha=0.8)[0] for m in shown]
        mean = np.nanmean(loss, axis=1)
        mean_line = ax.plot([], [], color="black", lw=2.2, label="mean, all tracked")[0]
        dots = ax.scatter(np.zeros(len(shown)), np.zeros(len(shown)), s=14, zorder=3)
        for k in np.unique(target):
            ax.plot([], [], color=class_color(int(k)), label=names[int(k)] if int(k) < len(names) else str(k))
        ax.scatter([], [], color=DECREASE, s=14, label="loss fell")
        ax.scatter([], [], color=INCREASE, s=14, label="loss rose")
        ax.set(xlim=(x[0], x[-1] if x[-1] > x[0] else x[0] + 1), ylim=(0, top), xlabel=xlabel,
               ylabel="cross-entropy loss")
        if source == "train":
            integer_axis(ax)
        fig.legend(loc="outside right center", fontsize=7, title="class / change")
        title = ax.set_title("")

        def update(j):
            i = int(frames[j])
            for line, m in zip(lines, shown):
                line.set_data(x[:i + 1], loss[:i + 1, m])
            mean_line.set_data(x[:i + 1], mean[:i + 1])
            p = int(frames[j - 1]) if j > 0 else i
            change = loss[i, shown] - loss[p, shown]
            dots.set_offsets(np.column_stack([np.full(len(shown), x[i]), loss[i, shown]]))
            dots.set_color(np.where(change > 0, INCREASE, DECREASE))
            where = f"step {int(x[i])}" if source == "probe" else f"epoch {int(x[i])}"
            title.set_text(f"Per-example loss trajectories ({len(shown)} examples), {where}")
            return []

        return _save(fig, update, range(len(frames)), path, fps)
