"""Smoothing for per-step series: a centred moving mean, so a peak stays where it happened
(a trailing mean moves it late by half a window), ignoring missing steps."""
from __future__ import annotations

import numpy as np
import pandas as pd


def centred_mean(values, window: int) -> np.ndarray:
    """Centred moving mean over `window` points (clipped to the series' length), NaN-aware;
    at the edges the window shrinks rather than padding."""
    v = np.asarray(values, dtype=np.float64)
    w = max(1, min(int(window), len(v)))
    return pd.Series(v).rolling(w, center=True, min_periods=1).mean().to_numpy()
