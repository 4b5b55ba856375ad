"""Feature-signal figures: how layers' representations relate (correlation grid, CKA), how
those relations evolve over training, and intra-layer feature/sample correlation."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from dynascope.analysis import features as F
from dynascope.analysis.correlation import mean_abs
from dynascope.analysis.run import Run

from .registry import PER_TARGET, register_figure
from .style import DIVERGING_CMAP, PALETTE, SEQUENTIAL_CMAP, integer_axis, mark_blocks, figure_style

NEEDS = ("activations",)


def _probe_label(run: Run, probe: int) -> str:
    ds = run.group("activations")
    p = F._probe_indices(ds, probe)[0]
    coords = F._probe_coords(run, [p])
    parts = [f"probe {p}"]
    if "epoch" in coords:
        e = int(coords["epoch"][1][0])
        parts.append("before training" if e < 0 else f"after epoch {e + 1}")
    if "step" in coords:
        parts.append(f"step {int(coords['step'][1][0])}")
    return ", ".join(parts)


def _steps(ds) -> tuple[np.ndarray, str]:
    """x positions of probe passes: epochs completed when probes are once per epoch, else steps."""
    if "epoch" in ds.coords:
        e = ds["epoch"].values
        if len(e) > 1 and np.all(np.diff(e) == 1):
            return e + 1, "epochs completed"
    if "step" in ds.coords:
        return ds["step"].values, "training step"
    return ds["probe"].values, "probe pass"


def unit_order(r: np.ndarray) -> np.ndarray:
    """Units ordered by their loading on the leading eigenvector of the within-layer
    correlation, so correlated units sit together and blocks of them become visible
    (an arbitrary unit order shows the same matrix as noise)."""
    m = np.nan_to_num(np.asarray(r, np.float64))
    if m.shape[0] < 3:
        return np.arange(m.shape[0])
    _, vecs = np.linalg.eigh((m + m.T) / 2)
    lead = vecs[:, -1] * np.sign(vecs[:, -1].sum() or 1)
    return np.argsort(lead, kind="stable")


def _heat(ax, data, cmap, vmin, vmax):
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.5)
    return ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto")


@register_figure("layer_correlation_grid", needs=NEEDS)
def layer_correlation_grid(run: Run, probe: int = -1, layers=None, max_units: int = 48):
    """Pearson r between the units of every pair of layers (i <= j) at one probe pass; each
    layer's units are ordered by the leading eigenvector of its own correlation matrix, so
    groups of correlated units appear as blocks."""
    blocks = F.correlation_blocks(run, probe, layers, max_units)
    names = F.activation_layers(run, layers)
    order = {a: unit_order(blocks[(a, a)].values) for a in names}
    L = len(names)
    with figure_style():
        size = max(1.35, min(2.2, 9.0 / L))
        fig, axes = plt.subplots(L, L, figsize=(size * L + 1.0, size * L + 0.4), squeeze=False)
        im = None
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                ax = axes[i, j]
                if j < i:
                    ax.set_axis_off()
                    continue
                r = blocks[(a, b)].values
                summary = mean_abs(r, exclude_diagonal=(a == b))
                r = r[np.ix_(order[a], order[b])]
                im = _heat(ax, r, DIVERGING_CMAP, -1, 1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                ax.text(0.97, 0.03, f"mean |r| {summary:.2f}", transform=ax.transAxes, ha="right",
                        va="bottom", fontsize=6.5, bbox=dict(boxstyle="round,pad=0.2", fc="white",
                                                             ec="none", alpha=0.85))
                if i == 0:
                    ax.set_title(f"{F.display_name(b)} ({r.shape[1]} units)", fontsize=8)
                if j == i:
                    ax.set_ylabel(f"{F.display_name(a)} ({r.shape[0]} units)", fontsize=8)
        fig.colorbar(im, ax=axes, shrink=0.6, label="Pearson r (units of row layer vs column layer)")
        fig.suptitle(f"Unit-unit correlation between layers ({_probe_label(run, probe)})")
    return fig


def _pairs(n: int, pairs: str) -> list[tuple[int, int]]:
    """Layer pairs i < j to draw: all of them when readable (<= 6 lines), else adjacent ones."""
    if pairs == "auto":
        pairs = "all" if n * (n - 1) // 2 <= 6 else "adjacent"
    if pairs == "adjacent":
        return [(i, i + 1) for i in range(n - 1)]
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def _legend_right(ax, entries: int) -> None:
    """Legend beside the panel: lines start at the same values and would hide it inside."""
    ax.legend(fontsize=6.5, ncol=1 if entries <= 10 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, frameon=False)


def _annotate(ax, M):
    if M.shape[0] > 8:
        return
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if M[i, j] < 0.6 else "black")


@register_figure("cka_heatmap", needs=NEEDS)
def cka_heatmap(run: Run, probes=None, layers=None, debiased: bool = False, panels: int = 4):
    """Linear CKA between every pair of layers at a few probe passes (first ... last)."""
    ds = run.group("activations")
    if probes is None:
        probes = sorted(set(F.even_subset(ds.sizes["probe"], panels).tolist()))
    res = F.layer_cka(run, layers, probes, debiased=debiased)
    names = list(res["layer_a"].values)
    n = len(probes)
    with figure_style():
        fig, axes = plt.subplots(1, n, figsize=(2.3 * n + 1.2, 2.7), squeeze=False)
        for k, p in enumerate(res["probe"].values):
            ax = axes[0, k]
            M = res["cka"].values[k]
            im = _heat(ax, M, SEQUENTIAL_CMAP, 0, 1)
            ax.set_aspect("equal")
            _annotate(ax, M)
            ax.grid(False)
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(names)), names if k == 0 else [])
            ax.set_title(_probe_label(run, int(p)).replace(", ", "\n", 1), fontsize=8)
        fig.colorbar(im, ax=axes, shrink=0.85, label=("debiased " if debiased else "") + "linear CKA")
        fig.suptitle("Representation similarity between layers over training")
    return fig


@register_figure("cka_evolution", needs=NEEDS)
def cka_evolution(run: Run, layers=None, debiased: bool = False, pairs: str = "auto"):
    """CKA of each layer pair over training, and each layer's drift towards its final state."""
    res = F.layer_cka(run, layers, debiased=debiased)
    drift = F.representation_drift(run, layers, debiased=debiased)
    x, xlabel = _steps(res)
    names = list(res["layer_a"].values)
    with figure_style():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.6, 2.9))
        chosen = _pairs(len(names), pairs)
        for k, (i, j) in enumerate(chosen):
            ax1.plot(x, res["cka"].values[:, i, j], "-" if j == i + 1 else ":", marker="o", ms=2.5,
                     color=PALETTE[k % len(PALETTE)], label=f"{names[i]} / {names[j]}")
        ax1.set(xlabel=xlabel, ylabel="linear CKA", ylim=(0, 1.02),
                title="Between layers" + (" (solid: adjacent)" if len(chosen) > len(names) - 1 else " (adjacent)"))
        _legend_right(ax1, len(chosen))
        for i, name in enumerate(drift["layer"].values):
            ax2.plot(x, drift["cka_to_reference"].values[:, i], "-o", ms=2.5, color=PALETTE[i % len(PALETTE)],
                     label=str(name))
        ax2.set(xlabel=xlabel, ylabel="CKA with final representation", title="Drift of each layer",
                ylim=(0, 1.02))
        for ax in (ax1, ax2):
            integer_axis(ax)
        _legend_right(ax2, len(names))
    return fig


@register_figure("layer_correlation_evolution", needs=NEEDS)
def layer_correlation_evolution(run: Run, layers=None, max_units: int = 256, pairs: str = "auto"):
    """Mean |Pearson r| between the units of each layer pair over training."""
    res = F.layer_correlation(run, layers, max_units=max_units)
    x, xlabel = _steps(res)
    names = list(res["layer_a"].values)
    with figure_style():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.6, 2.9))
        for i, name in enumerate(names):
            ax1.plot(x, res["mean_abs_r"].values[:, i, i], "-o", ms=2.5, color=PALETTE[i % len(PALETTE)],
                     label=name)
        ax1.set(xlabel=xlabel, ylabel="mean |r| between units", title="Within a layer (redundancy)")
        _legend_right(ax1, len(names))
        chosen = _pairs(len(names), pairs)
        for k, (i, j) in enumerate(chosen):
            ax2.plot(x, res["mean_abs_r"].values[:, i, j], "-" if j == i + 1 else ":", marker="o", ms=2.5,
                     color=PALETTE[k % len(PALETTE)], label=f"{names[i]} / {names[j]}")
        ax2.set(xlabel=xlabel, ylabel="mean |r| between units",
                title="Between layers" + (" (solid: adjacent)" if len(chosen) > len(names) - 1 else " (adjacent)"))
        _legend_right(ax2, len(chosen))
        lo = min(0.0, float(res["mean_abs_r"].min()))
        integer_axis(ax1)
        integer_axis(ax2)
        for ax in (ax1, ax2):
            ax.set_ylim(lo, max(ax1.get_ylim()[1], ax2.get_ylim()[1]))
    return fig


def _chosen(run: Run, layers) -> list[str]:
    names = F.activation_layers(run, layers)
    return names if layers is not None else sorted({names[0], names[-1]}, key=names.index)


@register_figure("feature_correlation", needs=NEEDS)
def feature_correlation(run: Run, layers=None, probe: int = -1, max_units: int = 128):
    """Unit-unit (feature-feature) correlation within chosen layers (default first and last),
    units ordered by the leading eigenvector of the matrix so that correlated units sit together."""
    names = _chosen(run, layers)
    with figure_style():
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 1.0, 3.0), squeeze=False)
        for ax, a in zip(axes[0], names):
            r = F.feature_correlation(run, a, probe, max_units)
            o = unit_order(r.values)
            im = _heat(ax, r.values[np.ix_(o, o)], DIVERGING_CMAP, -1, 1)
            ax.set_aspect("equal")
            ax.grid(False)
            total = run.group("activations").sizes[f"{a}__unit"]
            shown = f"{r.shape[0]} units" if r.shape[0] == total else f"{r.shape[0]} of {total} units"
            ax.set(xlabel="unit (ordered)", ylabel="unit (ordered)", title=f"{F.display_name(a)} ({shown})")
        fig.colorbar(im, ax=axes, shrink=0.85, label="Pearson r over probe examples")
        fig.suptitle(f"Feature-feature correlation ({_probe_label(run, probe)})")
    return fig


@register_figure("sample_correlation", needs=NEEDS + ("probe/target",), tasks=PER_TARGET)
def sample_correlation(run: Run, layers=None, probe: int = -1, max_examples: int = 120):
    """Example-example correlation of activation vectors within chosen layers, grouped by class."""
    names = _chosen(run, layers)
    with figure_style():
        fig, axes = plt.subplots(1, len(names), figsize=(3.0 * len(names) + 1.0, 3.1), squeeze=False)
        for ax, a in zip(axes[0], names):
            r = F.sample_correlation(run, a, probe, max_examples)
            im = _heat(ax, r.values, DIVERGING_CMAP, -1, 1)
            ax.set_aspect("equal")
            ax.grid(False)
            target = r["target"].values
            centres, firsts = mark_blocks(ax, target, lw=0.4)
            classes = [run.class_names[int(t)] if 0 <= int(t) < len(run.class_names) else str(t)
                       for t in target[firsts]]
            ax.set_xticks(centres, classes, fontsize=6, rotation=90)
            ax.set_yticks(centres, classes, fontsize=6)
            ax.tick_params(length=0)
            ax.set(xlabel="example (grouped by class)", ylabel="example (grouped by class)",
                   title=f"{F.display_name(a)} ({r.shape[0]} examples)")
        fig.colorbar(im, ax=axes, shrink=0.85, label="Pearson r over units")
        fig.suptitle(f"Sample-sample correlation ({_probe_label(run, probe)})")
    return fig
