"""One publication style for every figure: sizes, fonts, a colour-blind-safe palette
(Okabe & Ito 2008) and a saver that writes PNG/PDF/SVG at 300 dpi."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are batch-rendered; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

# Okabe-Ito (without its black and pale yellow, which clash with reference lines and white
# backgrounds) completed with Paul Tol's muted colours: ten classes, colour-blind safe.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
           "#56B4E9", "#332288", "#999933", "#882255", "#44AA99"]
INCREASE = "#D55E00"   # red-ish: loss went up / forgetting
DECREASE = "#009E73"   # green: loss went down / learning
TRAIN = PALETTE[0]
TEST = PALETTE[1]
SEQUENTIAL_CMAP = "viridis"
DIVERGING_CMAP = "RdBu_r"
DPI = 300
FORMATS = ("png",)

RC = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "figure.constrained_layout.use": True,
    "image.cmap": SEQUENTIAL_CMAP,
}


@contextmanager
def style():
    """Apply the dynascope style for the figures created inside the block."""
    with plt.rc_context(RC):
        yield


def integer_axis(ax, axis: str = "x") -> None:
    """Epochs and counts are integers: never label them 0.5."""
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def mark_blocks(ax, keys, lw: float = 0.5):
    """Separate runs of equal `keys` on a square heatmap with thin lines; returns the centre
    of each run and the index of its first row (for tick labels)."""
    import numpy as np

    keys = np.asarray(keys)
    edges = np.flatnonzero(np.diff(keys)) + 0.5
    for e in edges:
        ax.axhline(e, color="k", lw=lw)
        ax.axvline(e, color="k", lw=lw)
    bounds = np.concatenate([[-0.5], edges, [len(keys) - 0.5]])
    firsts = np.concatenate([[0], (edges + 0.5).astype(int)])
    return (bounds[:-1] + bounds[1:]) / 2, firsts


def class_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def save_figure(fig, path: str | Path, formats=FORMATS) -> list[Path]:
    """Save `fig` as path.<fmt> for each format; returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        out = path.with_suffix(f".{fmt}")
        fig.savefig(out, format=fmt, dpi=DPI)
        written.append(out)
    plt.close(fig)
    return written
