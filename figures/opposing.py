"""Opposing-signal figures: pairs over time, the class-pair matrix, the cosine histogram,
loss-change bars and distribution, gradient norms of opposing vs other examples, loss
trajectories of opposing groups and a montage of the top opposing examples.

Every figure computes its numbers through `analysis.opposing`; none reads zarr itself.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from dynascope import analysis
from dynascope.analysis.opposing import cosine_histogram, loss_change_outliers
from dynascope.analysis.run import Run

from .montage import example_images
from .registry import CLASS_LABELS, PER_TARGET, register_figure
from .smooth import centred_mean
from .style import DECREASE, INCREASE, PALETTE, SEQUENTIAL_CMAP, TRAIN, integer_axis, figure_style

NEEDS = ("probe/grad_proj",)
OTHER = "0.65"  # neutral grey: "everything else"


def _names(run: Run, classes) -> list[str]:
    names = run.class_names
    return [names[int(c)] if 0 <= int(c) < len(names) else str(c) for c in classes]


@register_figure("opposing_pairs_over_time", needs=NEEDS, tasks=CLASS_LABELS)
def opposing_pairs_over_time(run: Run, **params):
    """Number of opposing pairs and of examples involved at each probe pass."""
    r = analysis.opposing_pairs(run, **params)
    x = r["step"].values  # probe passes carry the training step they followed
    with figure_style():
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        ax.plot(x, r["pair_count"], "o-", ms=3, color=TRAIN, label="opposing pairs")
        ax.plot(x, r["example_count"], "s--", ms=3, color=PALETTE[1], label="examples in a pair")
        p = r.attrs["params"]
        ax.set(xlabel="training step", ylabel="count",
               title=f"Opposing pairs over training (cos ≤ {p['cos_threshold']}, "
                     f"norm ratio ≤ {p['magnitude_ratio']})")
        integer_axis(ax, "y")
        ax.legend()
    return fig


@register_figure("opposing_class_matrix", needs=NEEDS, tasks=CLASS_LABELS)
def opposing_class_matrix(run: Run, **params):
    """Which class pairs oppose: opposing-pair counts summed over all probe passes."""
    r = analysis.opposing_pairs(run, **params)
    m = r["class_pair_count"].values
    names = _names(run, r["class_a"].values)
    n = len(names)
    with figure_style():
        fig, ax = plt.subplots(figsize=(1.2 + 0.42 * n, 0.9 + 0.38 * n))
        im = ax.imshow(m, cmap=SEQUENTIAL_CMAP, interpolation="nearest")
        ax.grid(False)
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        if n <= 12:
            top = m.max() if m.max() > 0 else 1
            for i in range(n):
                for j in range(n):
                    if m[i, j]:
                        ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=6.5,
                                color="white" if m[i, j] < 0.6 * top else "black")
        ax.set(xlabel="class of example b", ylabel="class of example a",
               title="Opposing pairs by class pair")
        fig.colorbar(im, ax=ax, label="opposing pairs (all probes)", shrink=0.85)
    return fig


@register_figure("gradient_cosine_histogram", needs=NEEDS, tasks=CLASS_LABELS)
def gradient_cosine_histogram(run: Run, probes=-1, bins: int = 80):
    """Distribution of pairwise gradient cosines, same- vs cross-class, with the opposing_pairs
    threshold (as saved or set with --param opposing_pairs.cos_threshold)."""
    h = cosine_histogram(run, probes=probes, bins=bins)
    cos_threshold = analysis.opposing_pairs.params_for(run)["cos_threshold"]
    x = h["cosine"].values
    w = x[1] - x[0]
    with figure_style():
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        ax.bar(x, h["cross_class"], width=w, color=PALETTE[0], alpha=0.75, label="different classes")
        ax.bar(x, h["same_class"], width=w, color=PALETTE[1], alpha=0.75, label="same class")
        if cos_threshold is not None:
            ax.axvline(cos_threshold, color=INCREASE, ls="--", lw=1.2, label=f"opposing: cos ≤ {cos_threshold}")
        ax.set_yscale("log")
        when = ", ".join(str(t) for t in h.attrs["times"])
        ax.set(xlabel="cosine similarity of per-example gradients", ylabel="example pairs (log)",
               title=f"Pairwise gradient cosines (probe pass {when})", xlim=(-1, 1))
        ax.legend()
    return fig


def _interval_with_largest_moves(o) -> int:
    spread = np.nanmax(np.abs(o["loss_change"].values), axis=1)
    return int(np.nanargmax(spread))


@register_figure("loss_change_bars", needs=("probe/loss",), tasks=PER_TARGET)
def loss_change_bars(run: Run, interval: int | None = None, top: int = 15, z: float = 3.5):
    """The largest per-example loss increases (red) and decreases (green) between two
    probe passes, and the distribution of all loss changes with outliers highlighted."""
    o = loss_change_outliers(run, z=z)
    t = _interval_with_largest_moves(o) if interval is None else int(interval)
    d = o["loss_change"].values[t]
    ok = np.flatnonzero(np.isfinite(d))
    order = ok[np.argsort(d[ok])]
    sel = np.r_[order[:top], order[-top:][::-1]] if len(order) > 2 * top else order[::-1]
    sel = sel[np.argsort(-d[sel])]
    ids = o["example_id"].values[sel]
    cls = _names(run, o["target"].values[sel])
    s0, s1 = int(o["interval_start"][t]), int(o["interval_end"][t])
    with figure_style():
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.2, 3.2), gridspec_kw={"width_ratios": [1.5, 1]})
        colors = [INCREASE if v > 0 else DECREASE for v in d[sel]]
        ax.bar(np.arange(len(sel)), d[sel], color=colors)
        ax.set_xticks(np.arange(len(sel)), [f"{i} ({c})" for i, c in zip(ids, cls)], rotation=90, fontsize=5.5)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set(xlabel="example id (class)", ylabel="loss change",
               title=f"Largest loss changes, steps {s0}→{s1}")
        ax.legend(handles=[Patch(color=INCREASE, label="loss increase"),
                           Patch(color=DECREASE, label="loss decrease")], loc="lower left")
        allc = o["loss_change"].values.ravel()
        inc = o["outlier_increase"].values.ravel()
        dec = o["outlier_decrease"].values.ravel()
        fin = np.isfinite(allc)
        edges = np.linspace(np.nanmin(allc), np.nanmax(allc), 60)
        ax2.hist([allc[fin & ~inc & ~dec], allc[inc], allc[dec]], bins=edges, stacked=True,
                 color=[OTHER, INCREASE, DECREASE],
                 label=["typical", f"outlier increase (z > {z})", f"outlier decrease (z < −{z})"])
        ax2.set_yscale("log")
        ax2.set(xlabel="loss change between probe passes", ylabel="example × interval (log)",
                title="All loss changes")
        ax2.legend(fontsize=6.5, loc="upper left")
    return fig


@register_figure("opposing_gradient_norms", needs=NEEDS, tasks=CLASS_LABELS)
def opposing_gradient_norms(run: Run, **params):
    """Per-example gradient norms of examples in opposing pairs vs all other examples."""
    r = analysis.opposing_pairs(run, **params)
    p = run.probe
    has_exact = "grad_norm" in p
    if has_exact:
        norms = p["grad_norm"].values
    elif "grad_proj_scale" in p:  # the sketch is stored as unit rows times this norm
        norms = p["grad_proj_scale"].values
    else:
        norms = ((p["grad_proj"].astype("float32") ** 2).sum("proj") ** 0.5).values
    in_pair = np.zeros(norms.shape, bool)
    pos = {int(e): i for i, e in enumerate(p["example_id"].values)}
    for t, a, b in zip(r["at_probe"].values, r["example_a"].values, r["example_b"].values):
        in_pair[t, pos[int(a)]] = in_pair[t, pos[int(b)]] = True
    fin = np.isfinite(norms) & (norms > 0)
    with figure_style():
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        lo = max(norms[fin].min(), np.percentile(norms[fin], 0.5))  # a handful of fitted examples: ~0
        edges = np.logspace(np.log10(lo), np.log10(norms[fin].max()), 50)
        for m, color, label in ((fin & ~in_pair, OTHER, "other"), (fin & in_pair, INCREASE, "in an opposing pair")):
            v = norms[m]
            ax.hist(v, bins=edges, color=color, alpha=0.7, weights=np.full(len(v), 1 / max(len(v), 1)),
                    label=f"{label} ({len(v)})")
        ax.set_xscale("log")
        ax.set(xlabel="per-example gradient norm" + ("" if has_exact else " (projected)"),
               ylabel="fraction of (example, pass)", title="Gradient norms at probe passes")
        ax.legend()
    return fig


@register_figure("majority_opposition", needs=("train/grad_proj",))
def majority_opposition_figure(run: Run, window: int = 9):
    """Share of each batch whose gradient opposes the rest of the batch, over training (per
    step, faint, and a centred moving mean), and each example's mean cosine to the others'
    mean gradient."""
    r = analysis.majority_opposition(run, source="train")
    threshold = r.attrs["params"]["threshold"]
    frac = r["opposing_fraction"].values
    steps = r["step"].values
    smooth = centred_mean(frac, window)
    per = r["mean_cosine"].values
    ids = r["example"].values
    with figure_style():
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8.2, 2.9))
        ax.plot(steps, 100 * frac, color=OTHER, lw=0.6, label="per step")
        ax.plot(steps, 100 * smooth, color=TRAIN, lw=1.5, label=f"centred {min(window, len(frac))}-step mean")
        ax.set(xlabel="training step", ylabel="examples opposing (% of batch)",
               title=f"Opposing the batch (cos to the others' mean < {threshold})")
        ax.legend()
        fin = per[np.isfinite(per)]
        lo, hi = (np.percentile(fin, [0.5, 99.5]) if len(fin) else (-1.0, 1.0))
        pad = max(0.02, 0.1 * (hi - lo))
        edges = np.linspace(max(-1, min(lo, threshold) - pad), min(1, max(hi, threshold) + pad), 41)
        groups = [(np.ones(len(ids), bool), OTHER, "all examples")]
        if run.has("ground_truth", "has_planted_feature"):
            planted = run.ground_truth["has_planted_feature"].values[ids]
            groups = [(~planted, OTHER, "without planted feature"), (planted, INCREASE, "with planted feature")]
        for m, color, label in groups:
            v = per[m & np.isfinite(per)]
            ax2.hist(np.clip(v, edges[0], edges[-1]), bins=edges, color=color, histtype="step", lw=1.5,
                     weights=np.full(len(v), 1 / max(len(v), 1)), label=f"{label} ({len(v)})")
        ax2.axvline(threshold, color="0.3", ls="--", lw=0.8, label=f"threshold {threshold}")
        ax2.set(xlabel="mean cosine to the rest of the batch", ylabel="fraction of examples",
                title="Per example, over its presentations")
        ax2.legend(fontsize=6.5, loc="upper left")
    return fig


def _groups(run, params):
    return analysis.opposing_groups(run, **params)


@register_figure("opposing_group_trajectories", needs=("probe/grad_proj", "probe/loss"), tasks=CLASS_LABELS)
def opposing_group_trajectories(run: Run, max_pairs: int = 2, **params):
    """Loss of the strongest opposing group pairs over training, and the training loss with
    the steps of strongest oscillation marked."""
    g = _groups(run, params)
    steps = g["step"].values
    npair = min(max_pairs, g.sizes["opposition"])
    with figure_style():
        fig, axes = plt.subplots(npair + 1, 1, figsize=(5.6, 2.1 * (npair + 1)), sharex=True)
        axes = np.atleast_1d(axes)
        if npair == 0:
            axes[0].text(0.5, 0.5, "no opposing groups at these thresholds", ha="center",
                         va="center", transform=axes[0].transAxes)
        for k in range(npair):
            ax = axes[k]
            for side, color in (("group_a", PALETTE[0]), ("group_b", PALETTE[1])):
                gi = int(g[side][k])
                members = g["member_example_id"].values[g["member_group"].values == gi]
                pos = np.searchsorted(g["example_id"].values, members)
                loss = run.probe["loss"].values[:, pos]
                ax.plot(steps, loss, color=color, lw=0.4, alpha=0.35)
                name = _names(run, [g["group_class"][gi]])[0]
                ax.plot(steps, g["group_mean_loss"][gi], color=color, lw=2,
                        label=f"group {gi}: {name}, {len(members)} examples")
            for s in g["strongest_step"].values[k][:3]:
                ax.axvline(s, color="0.4", ls=":", lw=0.8)
            ax.set(ylabel="loss at probe pass", title=f"Opposing groups (loss corr {float(g['loss_correlation'][k]):.2f}, "
                                        f"weighted gradient cos {float(g['gradient_cosine'][k]):.2f})")
            ax.legend(fontsize=6.5, loc="upper right")
        ax = axes[-1]
        bl = run.train["batch_loss"].values if run.has("train", "batch_loss") else None
        if bl is not None:
            ax.plot(np.arange(len(bl)), bl, color=TRAIN, lw=0.8, label="training batch loss")
            if npair:
                for s in g["strongest_step"].values[0][:3]:
                    ax.axvline(s, color="0.4", ls=":", lw=0.8)
                ax.plot([], [], color="0.4", ls=":", label="strongest oscillation")
            ax.legend(fontsize=6.5)
        ax.set(xlabel="training step", ylabel="batch loss")
    return fig


@register_figure("opposing_examples_montage", needs=("probe/grad_proj", "probe/loss", "examples/image"), tasks=CLASS_LABELS)
def opposing_examples_montage(run: Run, per_group: int = 8, pairs: bool = False, **params):
    """Thumbnails of the strongest opposing group pair (one row per group), or with
    pairs=True of the most opposing example pairs (two images per pair, side by side)."""
    from .montage import montage

    ids, caps = [], []
    if not pairs:
        g = _groups(run, params)
        if g.sizes["opposition"]:
            for side in ("group_a", "group_b"):
                gi = int(g[side][0])
                mine = g["member_group"].values == gi
                order = np.argsort(-g["member_hits"].values[mine], kind="stable")[:per_group]
                members = g["member_example_id"].values[mine][order]
                name = _names(run, [g["group_class"][gi]])[0]
                ids += [int(e) for e in members] + [-1] * (per_group - len(members))
                caps += [f"#{e}\ngroup {gi} ({name})" for e in members] + [""] * (per_group - len(members))
            title = "Strongest opposing groups: one row per group, most extreme movers first"
            ncols = per_group
    if not ids:
        r = analysis.opposing_pairs(run, **params)
        seen = set()
        for a, b, c in zip(r["example_a"].values, r["example_b"].values, r["cosine"].values):
            if (int(a), int(b)) in seen:
                continue
            seen.add((int(a), int(b)))
            for e in (int(a), int(b)):
                ids.append(e)
                caps.append(f"#{e} {_names(run, [run.group('examples')['target'].values[e]])[0]}\ncos {c:.2f}"
                            if run.has("examples", "target") else f"#{e}\ncos {c:.2f}")
            if len(seen) >= per_group:
                break
        title, ncols = "Most opposing example pairs (left/right neighbours form a pair)", 4
    real = np.array([e >= 0 for e in ids], bool)
    imgs = example_images(run, [max(e, 0) for e in ids])
    if imgs is not None and len(imgs):
        imgs = imgs.copy()
        imgs[~real] = 255  # blank tiles pad a short group
    flagged = None
    if run.has("ground_truth", "has_planted_feature"):
        flagged = run.ground_truth["has_planted_feature"].values[[max(e, 0) for e in ids]] & real
    return montage(imgs if ids else np.zeros((0, 1, 1, 3), np.uint8), caps, ncols=ncols, title=title,
                   highlight=flagged, highlight_label="planted feature, from ground truth")
