"""Offline analyses of a recorded run (xarray + dask; never imports torch).

Each analysis is a pure function (run, **params) -> xarray.Dataset, registered in
`analysis.registry.ANALYSES` so the CLI can enumerate them.
"""
from .run import Run, RunError, load_result, open_run, save_result, saved_results
from .registry import ANALYSES, available_analyses, register_analysis

# Analysis modules register themselves on import (one line each).
from . import curves  # noqa: F401,E402
from .curves import class_curves, epoch_curves, loss_change, loss_trajectories  # noqa: E402
from .dynamics_api import *  # noqa: F401,F403,E402  example dynamics (issue 5)
from . import features, augmentation  # noqa: F401,E402  feature signals (issue 6)
from .features import layer_cka  # noqa: F401,E402
from .cka import cka, cka_matrix, minibatch_cka  # noqa: F401,E402  analysis.cka(X, Y) is the function
from .opposing import majority_opposition, opposing_groups, opposing_pairs  # noqa: F401,E402  opposing signals (issue 4)
from .gradient_dynamics import gradient_dynamics, gradient_signs  # noqa: F401,E402  optimization insight (issue 7)
from .gap import generalisation_gap  # noqa: F401,E402  train/held-out gap at matching passes
from . import summaries  # noqa: F401,E402  one-line findings for `dynascope analyze` (after registration)

__all__ = [
    "Run", "RunError", "open_run", "save_result", "load_result", "saved_results",
    "ANALYSES", "available_analyses", "register_analysis",
    "epoch_curves", "class_curves", "loss_trajectories", "loss_change",
]
