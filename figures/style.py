"""One publication style for every figure: sizes, fonts, a colour-blind-safe palette
(Okabe & Ito 2008) and a saver that writes PNG/PDF/SVG at 300 dpi with TrueType (Type 42)
fonts, which journal PDF checkers accept and Type 3 fonts are not.

`Look(style, width, dpi)` picks one of the named styles (paper, talk, default) and a
physical width: "single" (3.3 in, one column), "double" (6.9 in, full page) or inches."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
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
    # no "tight" bbox: constrained layout already fits every label, and a tight bbox would
    # change the physical width a journal asks for
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "path",
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


# font sizes per named style; each replaces the defaults above
STYLES = {
    "default": {},
    "paper": {"font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7, "legend.fontsize": 6,
              "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.linewidth": 1.0, "axes.linewidth": 0.6},
    "talk": {"font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12, "legend.fontsize": 10,
             "xtick.labelsize": 10, "ytick.labelsize": 10, "lines.linewidth": 2.0},
}
WIDTHS = {"single": 3.3, "double": 6.9}
_LOOK: dict = {}


@dataclass(frozen=True)
class Look:
    """How figures are drawn and saved: named style, physical width (None: each figure's own)
    and resolution of raster output."""
    style: str = "default"
    width: float | None = None
    dpi: int = DPI

    @staticmethod
    def parse(style: str = "default", width=None, dpi: int | None = None) -> "Look":
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
        if width is not None and not isinstance(width, (int, float)):
            text = str(width).strip().lower()
            if text in WIDTHS:
                width = WIDTHS[text]
            else:
                try:
                    width = float(text.removesuffix("in"))
                except ValueError:
                    raise ValueError(f"width {width!r} is not 'single', 'double' or a number of inches") from None
        if width is not None and not 0.5 <= float(width) <= 40:
            raise ValueError(f"width {width} in is outside 0.5-40 inches")
        if dpi is not None and not 30 <= int(dpi) <= 2400:
            raise ValueError(f"dpi {dpi} is outside 30-2400")
        return Look(style, None if width is None else float(width), int(dpi or DPI))

    def rc(self) -> dict:
        return {**RC, **STYLES[self.style], "savefig.dpi": self.dpi}


@contextmanager
def looking(look: Look):
    """Draw the figures created inside the block in `look` (figure functions call figure_style())."""
    token = dict(_LOOK)
    _LOOK.clear()
    _LOOK["look"] = look
    try:
        with plt.rc_context(look.rc()):
            yield
    finally:
        _LOOK.clear()
        _LOOK.update(token)


def current_look() -> Look:
    return _LOOK.get("look", Look())


@contextmanager
def figure_style():
    """Apply the dynascope style (the current Look's) for the figures created inside the block."""
    with plt.rc_context(current_look().rc()):
        yield


def fit_width(fig, width: float | None) -> None:
    """Set a figure to `width` inches. Its aspect ratio is kept, except that a wide row of
    panels squeezed into one column keeps up to 0.75 x width of height (scaled strictly, a
    three-panel row would be under an inch tall)."""
    if width is None:
        return
    w, h = fig.get_size_inches()
    fig.set_size_inches(width, max(h * width / w, min(h, 0.75 * width)))
    if width < w:
        # a legend inside narrowed axes can be wider than them; letting it drive the layout
        # shrinks the axes to nothing, so it floats over the plot instead
        for ax in fig.axes:
            leg = ax.get_legend()
            if leg is not None:
                leg.set_in_layout(False)
                for t in leg.get_texts():
                    t.set_fontsize(min(t.get_fontsize(), 5.5))


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


def save_figure(fig, path: str | Path, formats=FORMATS, metadata=None) -> list[Path]:
    """Save `fig` as path.<fmt> for each format; returns the written paths.
    metadata: fmt -> dict for savefig (see figures.provenance.file_metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    look = current_look()
    written = []
    with plt.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42}):
        for fmt in formats:
            out = path.with_suffix(f".{fmt}")
            meta = (metadata or {}).get(fmt) if callable(getattr(metadata, "get", None)) else None
            fig.savefig(out, format=fmt, dpi=look.dpi, metadata=meta)
            written.append(out)
    plt.close(fig)
    return written
