"""Parameter checks shared by analyses: a value outside its meaningful range is one clear
error, never a result computed from a threshold that can never (or always) be met."""
from __future__ import annotations

import math


def check_range(name: str, value, lo: float, hi: float, meaning: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{lo}, {hi}] ({meaning}), got {value!r}") from None
    if math.isnan(v) or not lo <= v <= hi:
        raise ValueError(f"{name}={value!r} is outside [{lo}, {hi}] ({meaning}); choose a value in that range")
