"""Per-example statistics of the training presentations in passes over blocks of steps.

`sequences.gather` holds every presentation at once (memory grows with the number of
steps); these passes read `BLOCK_CELLS` presentations at a time and keep per-example
accumulators only (a few arrays of the number of examples), so memory is set by the
number of examples, not by how long the run trained.

Results are bit-identical to the gathered path: scores come from the same
`sequences._blockwise`, and every per-example sum adds the same float64 values in the same
order (time order within an example: step, then slot), because `np.add.at` applied in
row-major (step, slot) order adds sequentially exactly as `np.bincount` over
(example, time)-sorted presentations does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .run import Run
from .sequences import _available, _blockwise

BLOCK_CELLS = 1 << 17   # presentations per block (~5 MB of 10-class logits)


@dataclass
class Block:
    """The valid presentations of a block of train rows, in row-major (step, slot) order."""

    index: np.ndarray        # (p,) example id
    step: np.ndarray         # (p,) train step
    epoch: np.ndarray        # (p,)
    target: np.ndarray       # (p,)
    scores: dict             # name -> (p,) float32


class Examples:
    """Ids seen so far and each one's latest target; arrays grow with the largest id."""

    def __init__(self, size: int = 0):
        self.seen = np.zeros(size, dtype=bool)
        self.target = np.full(size, -1, dtype=np.int64)
        self.arrays: list[tuple[str, object]] = []   # accumulators to grow alongside

    def add(self, name: str, fill, dtype) -> None:
        setattr(self, name, np.full(len(self.seen), fill, dtype=dtype))
        self.arrays.append((name, fill))

    def observe(self, block: Block) -> None:
        need = int(block.index.max()) + 1 if len(block.index) else 0
        if need > len(self.seen):
            size = max(need, 2 * len(self.seen))
            for name, fill in [("seen", False), ("target", -1)] + self.arrays:
                old = getattr(self, name)
                new = np.full(size, fill, dtype=old.dtype)
                new[:len(old)] = old
                setattr(self, name, new)
        self.seen[block.index] = True
        self.target[block.index] = block.target   # sequential: the latest presentation wins

    @property
    def ids(self) -> np.ndarray:
        return np.flatnonzero(self.seen)


class PerExample:
    """What `sequences.per_example` needs from a Sequences: source, example ids, targets."""

    def __init__(self, examples: Examples):
        self.source = "train"
        self.examples = examples.ids
        self.target = examples.target[self.examples]

    @property
    def num_examples(self) -> int:
        return len(self.examples)


def step_blocks(train) -> list[slice]:
    """Slices of about `BLOCK_CELLS` presentations of the train table, in whole zarr chunks."""
    rows, slots = train.sizes["step"], max(1, train.sizes.get("slot", 1))
    chunks = train["example_id"].chunks
    chunk = chunks[0][0] if chunks else rows
    per = max(chunk, BLOCK_CELLS // slots // max(chunk, 1) * chunk, 1)
    return [slice(start, min(rows, start + per)) for start in range(0, rows, per)]


def _row_blocks(train) -> Iterator[tuple[int, object, np.ndarray, np.ndarray]]:
    """(first step, rows, example ids, targets) of each block of whole zarr chunks."""
    for rows in step_blocks(train):
        start = rows.start
        sub = train.isel(step=rows)
        ids = sub["example_id"].values
        target = sub["target"].values if "target" in sub else np.full(ids.shape, -1)
        yield start, sub, ids, target


def _epochs(train) -> np.ndarray:
    return train["epoch"].values.astype(np.int64) if "epoch" in train else np.zeros(train.sizes["step"], np.int64)


def blocks(run: Run, scores, theta=None) -> Iterator[Block]:
    """The train table in blocks of whole zarr chunks, with `scores` for every presentation.
    `theta` is passed on to the score functions (the sequence-run definition of "correct")."""
    extra = () if theta is None else (theta,)
    train = run.train
    scores = _available(train, scores, *extra)
    epoch_all = _epochs(train)
    for start, sub, ids, target in _row_blocks(train):
        vals = _blockwise(sub, "step", target, scores, *extra)
        cells = np.flatnonzero(ids.ravel() >= 0)
        step = start + cells // ids.shape[1]
        yield Block(ids.ravel()[cells], step, epoch_all[step], target.ravel()[cells],
                    {k: v.ravel()[cells] for k, v in vals.items()})


def presence(run: Run) -> tuple[Examples, np.ndarray]:
    """The examples of the run with their latest targets, and which steps hold at least one
    presentation: one cheap pass over example ids and targets only."""
    train = run.train
    ex = Examples()
    used = np.zeros(train.sizes["step"], dtype=bool)
    none = np.empty(0, np.int64)   # observe reads ids and targets only
    for start, _, ids, target in _row_blocks(train):
        valid = ids >= 0
        used[start:start + len(ids)] = valid.any(1)
        cells = np.flatnonzero(valid.ravel())
        ex.observe(Block(ids.ravel()[cells], none, none, target.ravel()[cells], {}))
    return ex, used


def _valid(block: Block, name: str):
    v = block.scores[name]
    ok = ~np.isnan(v)
    return ok, v[ok].astype(np.float64)


def _grouped(index: np.ndarray):
    """Stable order by example; first/last flags of each example's run in that order."""
    order = np.argsort(index, kind="stable")
    idx = index[order]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = idx[1:] != idx[:-1]
    last = np.ones(len(idx), dtype=bool)
    last[:-1] = first[1:]
    return order, idx, first, last


def moments(run: Run, names, std=(), theta=None) -> tuple[PerExample, dict]:
    """Per-example count of presentations, and for each score its mean over the non-NaN
    presentations (plus the population std for names in `std`: a second pass, as in the
    gathered path's two-pass formula)."""
    ex = Examples()
    ex.add("presentations", 0, np.int64)
    for n in names:
        ex.add(f"n_{n}", 0, np.int64)
        ex.add(f"sum_{n}", 0.0, np.float64)
    for b in blocks(run, names, theta):
        ex.observe(b)
        ex.presentations += np.bincount(b.index, minlength=len(ex.seen))
        for n in names:
            ok, v = _valid(b, n)
            getattr(ex, f"n_{n}")[:] += np.bincount(b.index[ok], minlength=len(ex.seen))
            np.add.at(getattr(ex, f"sum_{n}"), b.index[ok], v)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for n in names:
            out[f"mean_{n}"] = getattr(ex, f"sum_{n}") / getattr(ex, f"n_{n}")
    if std:
        sq = {n: np.zeros(len(ex.seen)) for n in std}
        for b in blocks(run, std, theta):
            for n in std:
                ok, v = _valid(b, n)
                idx = b.index[ok]
                np.add.at(sq[n], idx, (v - out[f"mean_{n}"][idx]) ** 2)
        with np.errstate(invalid="ignore", divide="ignore"):
            for n in std:
                out[f"std_{n}"] = np.sqrt(sq[n] / getattr(ex, f"n_{n}"))
    keep = ex.ids
    res = {k: v[keep] for k, v in out.items()}
    res["presentations"] = ex.presentations[keep]
    return PerExample(ex), res


def correctness_counts(run: Run, theta=None) -> tuple[PerExample, dict]:
    """Forgetting/learning transitions between consecutive non-NaN presentations of each
    example, presentations and correct counts, first correct step and epoch."""
    ex = Examples()
    ex.add("last", -1, np.int8)            # correctness of the latest presentation (-1: none)
    for name in ("forgetting", "learning", "presentations", "times_correct"):
        ex.add(name, 0, np.int64)
    ex.add("first_step", np.nan, np.float64)
    ex.add("first_epoch", np.nan, np.float64)
    for b in blocks(run, ("correct",), theta):
        ex.observe(b)
        ok = ~np.isnan(b.scores["correct"])
        index, cur = b.index[ok], b.scores["correct"][ok].astype(bool)
        step, epoch = b.step[ok], b.epoch[ok]
        order, idx, first, last = _grouped(index)
        c, st, ep = cur[order], step[order], epoch[order]
        prev = np.empty(len(idx), dtype=np.int8)
        prev[1:] = c[:-1]
        prev[first] = ex.last[idx[first]]
        size = len(ex.seen)
        ex.forgetting += np.bincount(idx[(prev == 1) & ~c], minlength=size)
        ex.learning += np.bincount(idx[(prev == 0) & c], minlength=size)
        ex.presentations += np.bincount(idx, minlength=size)
        ex.times_correct += np.bincount(idx[c], minlength=size)
        hit = np.flatnonzero(c)
        hidx = idx[hit]
        firsthit = np.ones(len(hit), dtype=bool)
        firsthit[1:] = hidx[1:] != hidx[:-1]
        new = np.isnan(ex.first_step[hidx[firsthit]])
        ex.first_step[hidx[firsthit][new]] = st[hit[firsthit][new]]
        ex.first_epoch[hidx[firsthit][new]] = ep[hit[firsthit][new]]
        ex.last[idx[last]] = c[last]
    keep = ex.ids
    return PerExample(ex), {k: getattr(ex, k)[keep] for k in
                            ("forgetting", "learning", "presentations", "times_correct", "first_step", "first_epoch")}


def latest(run: Run, name: str, step: int | None = None, theta=None) -> tuple[PerExample, np.ndarray, np.ndarray]:
    """Each example's non-NaN `name` at its latest presentation at or before `step` (None:
    the end), and the step it came from (NaN if none). Every example of the whole run is
    listed, as in the gathered path."""
    ex = Examples()
    ex.add("score", np.nan, np.float64)
    ex.add("at", np.nan, np.float64)
    for b in blocks(run, (name,), theta):
        ex.observe(b)
        keep = ~np.isnan(b.scores[name])
        if step is not None:
            keep &= b.step <= step
        order, idx, _, last = _grouped(b.index[keep])
        ex.score[idx[last]] = b.scores[name][keep][order][last]
        ex.at[idx[last]] = b.step[keep][order][last]
    ids = ex.ids
    return PerExample(ex), ex.score[ids], ex.at[ids]


def epoch_tables(run: Run, names, theta=None, transform=None) -> tuple[PerExample, np.ndarray, dict]:
    """Mean of each score per (epoch, example) over its non-NaN presentations (NaN where an
    example had none), as float32 (bins, examples) tables; the epochs are those with at least
    one presentation. `transform` maps a name to a function applied to the float64 means
    before the cast (difficulty's 1 - p_gold).

    The result has a row per epoch, so it grows with the run; nothing else does. A first
    pass over the example ids sizes the tables, so each epoch's row is written in place when
    its last step has been read (known from the per-step `epoch` array): the float64 sums
    behind a row live only while its epoch is read."""
    transform = transform or {}
    epoch_all = _epochs(run.train)
    ex, used = presence(run)
    bins = np.unique(epoch_all[used])
    row_of_step = np.searchsorted(bins, epoch_all)
    last_step = np.full(len(bins), -1)
    np.maximum.at(last_step, row_of_step[used], np.flatnonzero(used))
    ids, width = ex.ids, len(ex.seen)
    tables = {n: np.full((len(bins), len(ids)), np.nan, dtype=np.float32) for n in names}
    open_rows: dict[int, dict] = {}           # row -> name -> (total, count) over all ids

    def close(r: int) -> None:
        for n, (total, count) in open_rows.pop(r).items():
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = total[ids] / count[ids]
            tables[n][r] = transform.get(n, lambda m: m)(mean)

    for b in blocks(run, names, theta):
        row = row_of_step[b.step]
        for r in np.unique(row):
            acc = open_rows.setdefault(int(r), {n: (np.zeros(width), np.zeros(width, np.int64)) for n in names})
            sel = row == r
            for n in names:
                total, count = acc[n]
                ok = ~np.isnan(b.scores[n][sel])
                idx = b.index[sel][ok]
                np.add.at(total, idx, b.scores[n][sel][ok].astype(np.float64))
                count += np.bincount(idx, minlength=width)
        if len(b.step):
            for r in [r for r in open_rows if last_step[r] <= b.step[-1]]:
                close(r)
    for r in list(open_rows):
        close(r)
    return PerExample(ex), bins, tables


def class_epoch_sums(run: Run, classes: np.ndarray) -> tuple[np.ndarray, dict]:
    """Per (epoch, class) sums over the training presentations, accumulated in float64:
    count, finite-loss sum, non-finite losses, correct, and presentations without logits.
    Every epoch of the per-step `epoch` array gets a row, presented or not."""
    epoch_raw = run.train["epoch"].values
    bins = np.unique(epoch_raw)
    row_of_step = np.searchsorted(bins, epoch_raw)
    k = len(classes)
    size = len(bins) * k
    sums = {n: np.zeros(size) for n in ("count", "loss_sum", "nonfinite", "correct_sum", "unknown")}
    for b in blocks(run, ("loss", "correct")):
        cls = np.searchsorted(classes, b.target)
        keep = np.isin(b.target, classes)
        key = row_of_step[b.step[keep]] * k + cls[keep]
        loss, ok = b.scores["loss"][keep].astype(np.float64), b.scores["correct"][keep].astype(np.float64)
        finite, known = np.isfinite(loss), ~np.isnan(ok)
        sums["count"] += np.bincount(key, minlength=size)
        sums["nonfinite"] += np.bincount(key[~finite], minlength=size)
        sums["loss_sum"] += np.bincount(key[finite], weights=loss[finite], minlength=size)
        sums["correct_sum"] += np.bincount(key[known], weights=ok[known], minlength=size)
        sums["unknown"] += np.bincount(key[~known], minlength=size)
    return bins, {n: v.reshape(len(bins), k) for n, v in sums.items()}


def forgetting_train(run: Run, never_learned: str, theta=None) -> tuple[PerExample, dict]:
    """`forgetting.forgetting_counts` for the train source, from one streamed pass."""
    from .forgetting import NEVER_LEARNED

    if never_learned not in NEVER_LEARNED:
        raise ValueError(f"never_learned must be one of {NEVER_LEARNED}, got {never_learned!r}")
    seq, c = correctness_counts(run, theta)
    forgetting = c["forgetting"].astype(np.float64)
    presentations, times_correct = c["presentations"], c["times_correct"]
    learned = times_correct > 0
    never = ~learned & (presentations > 0)
    forgetting[never] = {"presentations": presentations[never], "inf": np.inf, "exclude": np.nan}[never_learned]
    return seq, {"forgetting_events": forgetting, "learning_events": c["learning"],
                 "first_learned_step": c["first_step"], "unforgettable": learned & (forgetting == 0),
                 "never_learned": never, "presentations": presentations,
                 "fraction_correct": np.where(presentations > 0, times_correct / np.maximum(presentations, 1), np.nan),
                 "first_learned_epoch": c["first_epoch"]}
