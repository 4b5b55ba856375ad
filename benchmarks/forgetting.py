"""Benchmark: forgetting statistics for 50,000 examples x 200 epochs of presentations.

    python benchmarks/forgetting.py                       # in-memory table, store layout
    python benchmarks/forgetting.py --store-epochs 20     # + end to end through a store

The input is what `analysis.forgetting` sees in a run: a (step, slot) table of example ids
(batch 128, reshuffled every epoch, last batch padded with -1) and the correctness of each
presentation. The vectorised path is the one the analysis uses (`sequences.sort_table` +
`forgetting.forgetting_counts`). The baseline is a plain Python loop: append each cell's
correctness to its example's list, then count transitions per example. It is run on the
first `--loop-epochs` epochs and extrapolated linearly to all epochs (its cost is one
Python iteration per presentation plus one per example, so linear in presentations).
Peak memory is measured with tracemalloc (numpy reports its buffers to it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynascope.analysis.forgetting import forgetting_counts  # noqa: E402
from dynascope.analysis.sequences import sort_table  # noqa: E402


def make_table(n: int, epochs: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    steps_per_epoch = -(-n // batch)
    ids = np.full((epochs * steps_per_epoch, batch), -1, dtype=np.int64)
    for e in range(epochs):
        perm = np.full(steps_per_epoch * batch, -1, dtype=np.int64)
        perm[:n] = rng.permutation(n)
        ids[e * steps_per_epoch:(e + 1) * steps_per_epoch] = perm.reshape(steps_per_epoch, batch)
    # correctness as a two-state Markov chain per example: learned with an example-specific
    # probability per epoch, forgotten with a small one (a realistic few events per example)
    p_learn = rng.beta(2, 3, n)
    p_forget = 0.1 * rng.beta(1, 4, n)
    state = np.zeros(n, dtype=bool)
    correct = np.zeros(ids.shape, dtype=bool)
    for e in range(epochs):
        u = rng.random(n)
        state = np.where(state, u >= p_forget, u < p_learn)
        rows = ids[e * steps_per_epoch:(e + 1) * steps_per_epoch]
        ok = rows >= 0
        correct[e * steps_per_epoch:(e + 1) * steps_per_epoch][ok] = state[rows[ok]]
    return ids, correct


def vectorised(ids, correct, n):
    cell, examples, index, step = sort_table(ids)
    c = correct.ravel()[cell]
    return forgetting_counts(index, c, step, n, "presentations"), examples


def python_loop(ids, correct, n):
    seqs = [[] for _ in range(n)]
    for row_ids, row_ok in zip(ids.tolist(), correct.tolist()):
        for i, ok in zip(row_ids, row_ok):
            if i >= 0:
                seqs[i].append(ok)
    forgetting = []
    for q in seqs:
        f = sum(1 for a, b in zip(q, q[1:]) if a and not b)
        forgetting.append(f if any(q) else len(q))
    return np.array(forgetting)


def timed(fn, *args):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def store_end_to_end(n, epochs, batch, classes=10):
    """Write a run store with logits for `epochs` epochs and time analysis.forgetting on it."""
    import zarr

    from dynascope import analysis
    ids, correct = make_table(n, epochs, batch, seed=1)
    target = np.where(ids >= 0, ids % classes, -1)
    logits = np.zeros(ids.shape + (classes,), np.float32)
    win = np.where(correct, target, (target + 1) % classes)
    np.put_along_axis(logits, np.clip(win, 0, None)[..., None], 1.0, -1)
    logits[ids < 0] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        root = zarr.open_group(f"{tmp}/run.zarr", mode="w", zarr_format=3)
        g = root.create_group("train")
        for name, data, dims, fill in (("example_id", ids, ("step", "slot"), -1),
                                       ("target", target, ("step", "slot"), -1),
                                       ("loss", np.zeros(ids.shape, np.float32), ("step", "slot"), np.nan),
                                       ("logits", logits, ("step", "slot", "class"), np.nan),
                                       ("epoch", np.repeat(np.arange(epochs), ids.shape[0] // epochs).astype(np.int32),
                                        ("step",), -1)):
            chunks = (64,) + data.shape[1:]
            a = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=fill,
                               dimension_names=list(dims))
            a[...] = data
        root.attrs.update({"dynascope": {"schema_version": 1}, "status": "complete",
                           "committed": {"train": int(ids.shape[0])},
                           "dataset": {"num_examples": n, "num_classes": classes}})
        run = analysis.open_run(f"{tmp}/run.zarr")
        ds, dt, peak = timed(analysis.forgetting, run)
        ref = python_loop(ids, correct, n)
        assert np.array_equal(ds["forgetting_events"].values, ref)
    return int((ids >= 0).sum()), dt, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--loop-epochs", type=int, default=10, help="epochs the Python loop runs on")
    ap.add_argument("--store-epochs", type=int, default=0, help="also time analysis.forgetting on a store")
    args = ap.parse_args()
    n = args.examples
    ids, correct = make_table(n, args.epochs, args.batch)
    pres = int((ids >= 0).sum())
    print(f"table: {ids.shape[0]} steps x {ids.shape[1]} slots, {pres:,} presentations "
          f"({n:,} examples x {args.epochs} epochs)")
    (stats, _), dt, peak = timed(vectorised, ids, correct, n)
    inputs = ids.nbytes + correct.nbytes
    print(f"vectorised: {dt:.2f} s, peak {peak / 2**20:.0f} MiB above the {inputs / 2**20:.0f} MiB input table")
    rows = args.loop_epochs * (ids.shape[0] // args.epochs)
    sub_ids, sub_ok = ids[:rows], correct[:rows]
    (_, dt_sub, peak_loop) = timed(python_loop, sub_ids, sub_ok, n)
    sub_pres = int((sub_ids >= 0).sum())
    est = dt_sub * pres / sub_pres
    print(f"python loop: {dt_sub:.2f} s on {args.loop_epochs} epochs ({sub_pres:,} presentations, "
          f"peak {peak_loop / 2**20:.0f} MiB) -> {est:.0f} s extrapolated linearly to {args.epochs} epochs; "
          f"speed-up {est / dt:.0f}x")
    (s_sub, _), _, _ = timed(vectorised, sub_ids, sub_ok, n)
    ref = python_loop(sub_ids, sub_ok, n)
    assert np.array_equal(s_sub["forgetting_events"], ref), "vectorised and loop disagree"
    print("check: vectorised == loop on the subset")
    print(f"mean forgetting events {np.mean(stats['forgetting_events']):.2f}, "
          f"unforgettable {int(stats['unforgettable'].sum()):,}, never learned {int(stats['never_learned'].sum()):,}")
    if args.store_epochs:
        p, dt_s, peak_s = store_end_to_end(n, args.store_epochs, args.batch)
        print(f"store end to end (analysis.forgetting, logits (step, slot, 10) float32): {p:,} presentations "
              f"in {dt_s:.2f} s, peak {peak_s / 2**20:.0f} MiB (checked against the loop)")


if __name__ == "__main__":
    main()
