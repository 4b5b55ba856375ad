"""Forgetting events (Toneva et al., 2019, "An Empirical Study of Example Forgetting").

An example is *forgotten* when it is classified correctly at one presentation and
incorrectly at the next, and *learned* on the opposite transition. Examples never forgotten
once learned are *unforgettable*; examples never classified correctly are *never learned*,
and how they count is a choice the paper makes (infinitely forgettable), so it is a
parameter here. Correctness at a training presentation is argmax(logits) == target from
the forward pass before that step's update.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from . import blockwise
from .registry import register_analysis
from .run import Run
from .sequences import Sequences, gather, per_example

NEVER_LEARNED = ("presentations", "inf", "exclude")


def transitions(index: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over presentations 1..P-1 (aligned with the *later* presentation):
    forgetting (correct -> incorrect) and learning (incorrect -> correct) within an example.
    `index` must be sorted (presentations grouped by example, in time order)."""
    same = index[1:] == index[:-1]
    prev, cur = correct[:-1], correct[1:]
    return same & prev & ~cur, same & ~prev & cur


def forgetting_counts(index: np.ndarray, correct: np.ndarray, time: np.ndarray,
                      num_examples: int, never_learned: str = "presentations") -> dict[str, np.ndarray]:
    """The vectorised core on flat sorted arrays (also used by the benchmark)."""
    if never_learned not in NEVER_LEARNED:
        raise ValueError(f"never_learned must be one of {NEVER_LEARNED}, got {never_learned!r}")
    correct = np.asarray(correct, dtype=bool)
    forget, learn = transitions(index, correct)
    later = index[1:]
    n = num_examples
    forgetting = np.bincount(later[forget], minlength=n).astype(np.float64)
    learning = np.bincount(later[learn], minlength=n)
    presentations = np.bincount(index, minlength=n)
    times_correct = np.bincount(index[correct], minlength=n)
    learned = times_correct > 0
    first = _first_min(index, time, correct, n)  # time of the first correct presentation
    never = ~learned & (presentations > 0)
    if never_learned == "presentations":
        forgetting[never] = presentations[never]
    elif never_learned == "inf":
        forgetting[never] = np.inf
    else:
        forgetting[never] = np.nan
    return {"forgetting_events": forgetting, "learning_events": learning,
            "first_learned_step": first, "unforgettable": learned & (forgetting == 0),
            "never_learned": never, "presentations": presentations,
            "fraction_correct": np.where(presentations > 0, times_correct / np.maximum(presentations, 1), np.nan)}


def _first_min(index: np.ndarray, values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """`values` at each example's first presentation where `mask` holds (NaN if none); the
    presentations are in time order within an example, so that is the first occurrence."""
    hits = np.flatnonzero(mask)
    idx = index[hits]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = idx[1:] != idx[:-1]
    out = np.full(n, np.nan)
    out[idx[first]] = values[hits[first]]
    return out


def _correct_sequences(run: Run, source: str) -> tuple[Sequences, np.ndarray]:
    seq = gather(run, source, scores=("correct",))
    c = seq.scores["correct"]
    valid = ~np.isnan(c)
    if not valid.all():  # drop presentations without logits (never happens for complete rows)
        keep = np.flatnonzero(valid)
        seq = Sequences(seq.source, seq.examples, seq.index[keep], seq.step[keep], seq.epoch[keep],
                        seq.time[keep], seq.target, {"correct": c[keep]})
    return seq, seq.scores["correct"].astype(bool)


@register_analysis("forgetting", needs=("train/logits",))
def forgetting(run: Run, source: str = "train", never_learned: str = "presentations") -> xr.Dataset:
    """Per-example forgetting and learning events, first-learned step, unforgettable and
    never-learned flags (Toneva et al. 2019)."""
    if source == "train":   # streamed over step blocks: memory set by the number of examples
        seq, stats = blockwise.forgetting_train(run, never_learned)
    else:
        seq, correct = _correct_sequences(run, source)
        stats = forgetting_counts(seq.index, correct, seq.step, seq.num_examples, never_learned)
        # first_learned_step is a train step (for probes: train rows before the pass)
        stats["first_learned_step"] = _first_min(seq.index, seq.step, correct, seq.num_examples)
        stats["first_learned_epoch"] = _first_min(seq.index, seq.epoch, correct, seq.num_examples)
    ds = per_example(seq, stats, {"never_learned": never_learned})
    ds["forgetting_events"].attrs["long_name"] = (
        "forgetting events (correct -> incorrect between consecutive presentations); never-learned "
        f"examples: {never_learned}")
    ds["first_learned_step"].attrs["long_name"] = "train step of the first correct presentation (NaN: never)"
    return ds


@register_analysis("forgetting_timeline", needs=("train/logits",))
def forgetting_timeline(run: Run, source: str = "train") -> xr.Dataset:
    """Forgetting and learning events per (epoch, example), attributed to the epoch of the
    presentation at which the example turned out wrong (forgetting) or right (learning)."""
    seq, correct = _correct_sequences(run, source)
    forget, learn = transitions(seq.index, correct)
    epochs, einv = np.unique(seq.epoch, return_inverse=True)
    size = len(epochs) * seq.num_examples
    flat = (einv * seq.num_examples + seq.index)[1:]
    shape = (len(epochs), seq.num_examples)
    f = np.bincount(flat[forget], minlength=size).reshape(shape)
    lr = np.bincount(flat[learn], minlength=size).reshape(shape)
    ds = xr.Dataset({"forgetting_events": (("epoch", "example"), f.astype(np.int32)),
                     "learning_events": (("epoch", "example"), lr.astype(np.int32))},
                    coords={"epoch": epochs, "example": seq.examples,
                            "target": ("example", seq.target)})
    ds.attrs["source"] = source
    return ds
