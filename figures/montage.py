"""Image montages of selected training examples (thumbnails from the store's `examples` group),
so a report shows *which* examples are hard or forgotten, not just their ids."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from dynascope.analysis.run import Run

from .style import INCREASE, figure_style


def example_images(run: Run, ids) -> np.ndarray | None:
    """uint8 images (n, y, x, channel) of training examples `ids`, or None if not stored."""
    if not run.has("examples", "image"):
        return None
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros((0, 1, 1, 1), np.uint8)
    return np.asarray(run.group("examples")["image"].isel(example=ids).values)


def montage(images: np.ndarray, captions: list[str], ncols: int = 6, title: str | None = None,
            highlight=None, highlight_label: str = "flipped label"):
    """Grid of thumbnails with a caption under each; `highlight` (bool per image) draws a
    thick border, e.g. around examples whose label was flipped."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    with figure_style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(1.45 * ncols, 1.75 * nrows + (0.35 if title else 0)),
                                 squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if k >= n:
                ax.set_visible(False)
                continue
            img = images[k]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      interpolation="nearest")
            ax.set_xlabel(captions[k], fontsize=6.5, linespacing=1.1)
            flagged = highlight is not None and bool(highlight[k])
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color(INCREASE if flagged else "0.6")
                side.set_linewidth(2.5 if flagged else 0.5)
        if title:
            extra = f" (orange frame: {highlight_label})" if highlight is not None and np.any(highlight) else ""
            fig.suptitle(title + extra, fontsize=9)
    return fig
