"""Example-dynamics scores of sequence (language-model) runs, where the example is a
sequence and the recorder stored per-sequence token statistics instead of logits
(docs/SEQUENCES.md):

- correct:  token_accuracy >= `correct_threshold` (θ, default 0.5): the sequence counts as
            "classified correctly" when at least that fraction of its scored tokens is the
            argmax. θ = 1 asks for every token.
- p_gold:   target_prob, the mean probability of the target token over the scored tokens.
- margin:   mean over tokens of (target logit - largest other logit); AUM averages it.
- el2n:     mean over tokens of ||softmax - onehot(target)||_2.
- loss:     the per-sequence loss given to `step.record`.

Every other part of an analysis is unchanged, so forgetting, cartography, AUM, EL2N and the
curves mean on a sequence run what they mean on a classification run, with these scores.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

DEFAULT_THRESHOLD = 0.5
STORED = {"p_gold": "target_prob", "margin": "margin", "el2n": "el2n"}


def threshold(run, value) -> float | None:
    """θ for a sequence run (None -> the default); refuse θ on runs that have no tokens."""
    if run.task != "sequence":
        if value is not None:
            raise ValueError(f"correct_threshold applies to sequence runs only; this run is {run.task}")
        return None
    theta = DEFAULT_THRESHOLD if value is None else float(value)
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"correct_threshold is a token accuracy in [0, 1], got {value!r}")
    return theta


def scores(ds: xr.Dataset, names, theta: float) -> dict[str, np.ndarray]:
    """The named scores of every (row, slot) cell of a sequence run's group."""
    if "token_accuracy" not in ds:
        raise ValueError("this sequence run has no token statistics (token_accuracy); record them with "
                         "step.record(losses=..., logits=(B, T, V)) and rec.step(targets=(B, T) tokens)")
    out = {}
    for name in names:
        if name == "correct":
            acc = ds["token_accuracy"].values.astype(np.float32)
            with np.errstate(invalid="ignore"):
                out[name] = np.where(np.isnan(acc), np.nan, acc >= theta).astype(np.float32)
        elif name in STORED:
            out[name] = ds[STORED[name]].values.astype(np.float32)
        else:
            out[name] = ds[name].values.astype(np.float32)
    return out


def describe(theta: float | None) -> dict:
    """Attrs that say which definition of "correct" a result used."""
    if theta is None:
        return {}
    return {"task": "sequence", "correct_threshold": theta,
            "correct": f"token_accuracy >= {theta:g}", "p_gold": "mean target-token probability",
            "margin": "mean token margin"}
