"""Publication figures, animations and reports from analysis results (never imports torch).

Each figure is a function (run, **params) -> matplotlib Figure registered in
`figures.registry.FIGURES`; `render_all` batch-renders those the run has data for.
"""
from .registry import FIGURES, available_figures, register_figure
from .style import PALETTE, figure_style, save_figure

# Figure modules register themselves on import (one line each).
from . import curves  # noqa: F401,E402
from . import dynamics  # noqa: F401,E402  example dynamics (issue 5)
from . import features, augmentation  # noqa: F401,E402  feature signals (issue 6)
from . import animations  # noqa: F401,E402  example-dynamics GIFs (issue 5)
from . import opposing  # noqa: F401,E402  opposing signals (issue 4)
from . import optimization, sign_zoom  # noqa: F401,E402  optimization insight (issue 7)
from .render import render_all, render_figure  # noqa: E402
from . import compare  # noqa: F401,E402  figures over several runs
from .batch import render_runs, render_spec  # noqa: E402
from .report import write_report  # noqa: E402

__all__ = ["FIGURES", "available_figures", "register_figure", "PALETTE", "save_figure",
           "figure_style", "render_all", "render_figure", "render_runs", "render_spec", "write_report"]
